r"""NAS stage 1: ALBEF pre-training with the visual dictionary (VD on, NVA off).

The paper's setup: ViT-B/16 from DeiT, BERT-base split 6/6, 4M pairs (COCO + VG + CC3M + SBU),
29 epochs, global batch 512, AdamW (wd 0.02), warm-up 1,000 steps to 1e-4 then cosine to 1e-5,
256 px random-resized crops + flip + RandAugment(2, 7) without colour ops, text length 25,
queue 65,536, momentum 0.995, α 0 → 0.4 over the first epoch, VD of 2,048 codes.

  python -m nas_jax.train --config configs/stage1.py --workdir runs/stage1 \
      --config.data.paths="('/data/coco.json','/data/vg.json','/data/cc3m_train.json','/data/sbu.json')" \
      --config.data.vocab=/models/bert-base-uncased \
      --config.init_from=/models/albef_init   # from `python -m nas_jax.convert` (DeiT + BERT)

Expect about 2 days on 8 A800 (paper); see docs/PERF.md for measured H100 throughput.
`configs/stage1.py:albef` gives plain ALBEF (no visual dictionary), the paper's "w/o VD" row.
"""

from nas_jax import config_lib


def get_config(arg: str | None = None):
  if arg not in (None, "", "albef"):
    raise ValueError(f"configs/stage1.py:{arg}: use no suffix (NAS) or ':albef'")
  c = config_lib.base_config()
  c.stage = 1
  c.model.use_dictionary = arg != "albef"
  c.model.dtype = "bfloat16"
  c.model.vit_attention = "auto"  # cuDNN flash attention on GPUs (same function; docs/PERF.md).
  c.model.stacked_layout = True  # Few state arrays, unrolled layers: fastest on GPUs (PERF.md).
  c.mlm.max_masked = -1  # MLM heads on the masked tokens only; masking as ALBEF's for all but
                         # < 1e-5 of the texts (docs/RECIPE.md, PERF.md).
  c.nva.enabled = False
  c.num_epochs = 29
  c.data.source = "albef_json"
  c.data.vocab = ""  # Required: a local bert-base-uncased directory or vocab.txt.
  c.data.batch_size = 512
  c.data.image_size = 256
  c.model.vit.image_size = 256
  c.data.max_text_len = 25
  c.data.num_workers = 8
  c.checkpoint.every = 2000
  return c
