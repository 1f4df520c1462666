"""The shipped config files: every variant loads, the fine-tune recipe is shared, bad suffixes fail
with the file's name and the valid choices."""

import pytest

from nas_jax import config_lib
from step_utils import ROOT


@pytest.mark.parametrize("spec", [
    "stage1.py", "stage1.py:albef", "stage2.py", "finetune_coco.py", "finetune_coco.py:albef",
    "finetune_nta.py", "finetune_nta.py:ntva", "demo.py", "demo.py:tiny"])
def test_every_config_variant_loads(spec):
  c = config_lib.load_config_file(str(ROOT / "configs" / spec))
  assert c.data.batch_size > 0 and c.model.vit.image_size == c.data.image_size
  if c.continue_schedule:   # Stage 2 continues a run: the user names it, as the README says.
    with pytest.raises(config_lib.ConfigError, match=r"continue_schedule=True: .*--config.init_from"):
      config_lib.validate(c)
    c.init_from = "runs/stage1"
  config_lib.validate(c)   # Every shipped variant passes the start-up checks.


def test_finetune_configs_share_the_384px_recipe():
  coco = config_lib.load_config_file(str(ROOT / "configs/finetune_coco.py"))
  nta = config_lib.load_config_file(str(ROOT / "configs/finetune_nta.py:ntva"))
  for c in (coco, nta):
    assert (c.stage, c.model.vit.image_size, c.num_epochs, c.optim.lr, c.data.batch_size,
            c.data.max_text_len, c.model.dtype) == (3, 384, 5, 1e-5, 256, 30, "bfloat16")
  assert coco.itc.use_id_queue and coco.nva.enabled and coco.data.source == "albef_json"
  assert nta.itm.text_negatives and nta.nva.enabled and nta.data.source == "negclip_tsv"
  assert not config_lib.load_config_file(str(ROOT / "configs/finetune_coco.py:albef")).nva.enabled


@pytest.mark.parametrize("spec, msg", [
    ("stage1.py:vd", r"stage1.py:vd: use no suffix \(NAS\) or ':albef'"),
    ("stage2.py:nva", r"stage2.py:nva: this config takes no suffix"),
    ("finetune_coco.py:nva", r"finetune_coco.py:nva: use no suffix \(NAS\) or ':albef'"),
    ("finetune_nta.py:nva", r"finetune_nta.py:nva: use ':nta' \(default\) or ':ntva'")])
def test_unknown_config_suffix_names_the_choices(spec, msg):
  with pytest.raises(ValueError, match=msg):
    config_lib.load_config_file(str(ROOT / "configs" / spec))
