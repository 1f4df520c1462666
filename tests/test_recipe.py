"""The paper's recipe end to end, through the command lines a user types (README), on tiny sizes:

  PyTorch-layout DeiT, BERT and ALBEF checkpoints ─ nas_jax.convert ─┐
  train configs/stage1.py  (init_from = DeiT + BERT conversions)     │
  train configs/stage2.py  (init_from = stage 1, continue_schedule)   │
  train configs/finetune_coco.py at a larger image size (init_from = stage 2)
  train configs/finetune_nta.py:ntva (init_from = stage 2)           │
  nas_jax.eval on VALSE, Winoground, COCO retrieval and ARO COCO-Order samples,
      from the fine-tuned run and from the converted ALBEF folder ────┘

At each junction the test asserts what crossed it: weights equal to their source, the position
embedding resampled as ALBEF's `interpolate_pos_embed` (torch bicubic), queues and queue_ptr
carried, the step counter, AdamW state and learning rate of stage 2's first step, which objectives
each stage trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import safetensors.numpy

import bench_data
from conftest import subprocess_env
from step_utils import ROOT
from torch_layouts import StateDictMaker

RES, RES_FT, PATCH, QUEUE, BATCH = 16, 24, 8, 16, 4

RECIPE_CONFIG = textwrap.dedent(f'''
    """configs/<name>.py[:variant] as shipped, at tiny sizes: `recipe.py:<name>[+variant]`."""
    import importlib.util

    def get_config(arg):
      name, _, variant = arg.partition("+")
      spec = importlib.util.spec_from_file_location(name, {str(ROOT / "configs")!r} + f"/{{name}}.py")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config(variant or None)
      res = {RES_FT} if name.startswith("finetune") else {RES}
      c.model.vit.update(image_size=res, patch_size={PATCH}, hidden_size=32, num_layers=1,
                         num_heads=2, mlp_dim=64)
      c.model.bert.update(hidden_size=32, num_layers=2, fusion_layer=1, num_heads=2,
                          intermediate_size=64, max_position_embeddings=40)
      c.model.update(embed_dim=16, dtype="float32", vit_attention="xla")
      c.model.dictionary.size = 16
      c.itc.queue_size = {QUEUE}
      c.data.update(image_size=res, batch_size={BATCH}, max_text_len=16, num_workers=0,
                    randaugment=False)
      c.eval.max_text_len = 16
      c.checkpoint.update(every=0, async_save=False)
      c.log_every = 1
      return c
''')


def _run(module: str, *args: str, timeout: int = 300) -> str:
  env = subprocess_env()   # One CPU device, as a user's; cheaper CPU code generation.
  proc = subprocess.run([sys.executable, "-m", f"nas_jax.{module}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"nas_jax.{module} {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
  out = proc.stdout + proc.stderr
  # Reading another run's checkpoint names every item's type: no orbax warnings about the rest.
  assert "could not be restored" not in out, out
  return out


def _metrics(workdir) -> list[dict]:
  """The training rows of a run's metrics.jsonl (checkpoint rows carry no loss)."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "loss" in r]


def _state(workdir, parts=("params", "params_m", "batch_stats", "queues", "opt_state", "step")):
  """Parts of a run's newest checkpoint on the host (numpy), whatever wrote it, one subtree per
  layer (the stage configs store the layer stacks stacked: model.stacked_layout)."""
  from nas_jax import checkpoint
  from nas_jax.models import layer_stack
  meta = checkpoint.state_metadata(str(workdir))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {p: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            meta[p]) for p in parts if meta.get(p) is not None}
  return layer_stack.unstack_layers(
      jax.tree.map(np.asarray, checkpoint.restore_parts(str(workdir), target)))


TORCH_INTERPOLATE = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import torch.nn.functional as F

    def interpolate_pos_embed(pos, new_grid):   # salesforce/ALBEF models/vit.py, on one tensor
      pos = torch.from_numpy(pos)
      extra, grid = pos[:, :1], pos[:, 1:]
      old = int(grid.shape[1] ** 0.5)
      grid = grid.reshape(-1, old, old, pos.shape[-1]).permute(0, 3, 1, 2)
      grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
      grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
      return torch.cat((extra, grid), dim=1).numpy()

    x = dict(np.load(sys.argv[1]))
    np.savez(sys.argv[2], **{k[4:]: interpolate_pos_embed(x[k], int(x["grid"]))
                             for k in x if k.startswith("pos_")})
''')


def _adam_count(opt_state) -> int:
  return int(next(leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                  if jax.tree_util.keystr(path).endswith("['count']")))


def test_paper_recipe_through_the_clis(tmp_path, samples_dir, minilm_dir, run_torch):
  from nas_jax import checkpoint, config_lib

  cfg = tmp_path / "recipe.py"
  cfg.write_text(RECIPE_CONFIG)
  config = config_lib.load_config_file(f"{cfg}:stage1")   # bert-base's 30,522 words = minilm's

  # ---- data: ALBEF JSON (COCO), NegCLIP TSV, benchmark folders; images generated
  data = tmp_path / "data"
  coco_root, coco_records = bench_data.coco(samples_dir, data)
  negclip_tsv = bench_data.negclip(samples_dir, tmp_path / "negclip")
  bench_data.valse(samples_dir, data)
  bench_data.winoground(samples_dir, data)
  common = [f"--config.data.vocab={minilm_dir}", "--config.eval.enabled=False"]
  coco_data = [f"--config.data.paths=('{coco_root / 'coco_test.json'}',)",
               f"--config.data.image_root={coco_root}"]

  # ---- PyTorch-layout checkpoints → nas_jax.convert
  deit_sd = StateDictMaker(config.model, seed=1).deit(image_size=4 * RES)
  bert_sd = StateDictMaker(config.model, seed=2).hf_bert()
  albef_sd = StateDictMaker(config.model, seed=3).albef("pretrain", queue_size=QUEUE)
  for name, sd in (("deit", deit_sd), ("bert", bert_sd), ("albef", albef_sd)):
    safetensors.numpy.save_file(sd, str(tmp_path / f"{name}.safetensors"))
  w = tmp_path / "weights"
  _run("convert", "--source", "deit", "--ckpt", str(tmp_path / "deit.safetensors"),
       "--out", str(w / "deit"), "--config", f"{cfg}:stage1")
  _run("convert", "--source", "bert", "--ckpt", str(tmp_path / "bert.safetensors"),
       "--out", str(w / "bert"), "--config", f"{cfg}:stage1")
  _run("convert", "--source", "albef", "--ckpt", str(tmp_path / "albef.safetensors"),
       "--out", str(w / "albef"), "--config", f"{cfg}:stage1", "--image_size", str(RES_FT))

  # ---- stage 1 from DeiT + BERT (a learning rate small enough to compare with the sources)
  runs = tmp_path / "runs"
  out1 = _run("train", "--config", f"{cfg}:stage1", "--workdir", str(runs / "stage1"), *common,
              *coco_data, f"--config.init_from={w / 'deit'},{w / 'bert'}",
              "--config.total_steps=2", "--config.optim.lr=2e-9", "--config.optim.min_lr=1e-9",
              "--config.optim.warmup_steps=0")
  s1 = _state(runs / "stage1")
  assert "blocks" in checkpoint.state_metadata(str(runs / "stage1"))["params"]["vit"]   # stacked
  g = RES // PATCH
  np.testing.assert_allclose(s1["params"]["vit"]["patch_embed"]["proj"]["kernel"],
                             deit_sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0), atol=1e-6)
  np.testing.assert_allclose(s1["params"]["bert"]["layer_0"]["attention"]["query"]["kernel"],
                             bert_sd["bert.encoder.layer.0.attention.self.query.weight"].T, atol=1e-6)
  np.testing.assert_allclose(s1["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"],
                             bert_sd["bert.embeddings.word_embeddings.weight"], atol=1e-6)
  # The momentum encoders start as copies of the loaded encoders (ALBEF's copy_params).
  np.testing.assert_allclose(s1["params_m"]["vit"]["cls_token"], deit_sd["cls_token"], atol=1e-6)
  assert "tensors loaded" in out1

  # ---- stage 2 continues stage 1: step counter, AdamW state, schedule, queues
  _run("train", "--config", f"{cfg}:stage2", "--workdir", str(runs / "stage2"), *common, *coco_data,
       f"--config.init_from={runs / 'stage1'}", "--config.total_steps=1")
  m1, m2 = _metrics(runs / "stage1"), _metrics(runs / "stage2")
  assert [r["step"] for r in m1] == [1, 2] and [r["step"] for r in m2] == [3]
  assert m2[0]["lr"] == pytest.approx(1e-9)            # stage 1's cosine at its end, no warm-up
  assert "nva_replaced_frac" in m2[0] and "nva_replaced_frac" not in m1[0]
  assert m2[0]["nva_replaced_frac"] == pytest.approx(np.ceil(0.3 * g * g) / (g * g))
  assert m1[0]["loss_mlm"] > 0 and m2[0]["loss_mlm"] > 0
  s2 = _state(runs / "stage2")
  assert int(s2["step"]) == 3
  assert _adam_count(s2["opt_state"]) == 3            # AdamW's moments carried (fresh: 1)
  assert int(s2["queues"]["ptr"]) == 3 * BATCH % QUEUE
  np.testing.assert_array_equal(s2["queues"]["image"][:2 * BATCH], s1["queues"]["image"][:2 * BATCH])

  # ---- fine-tuning at RES_FT px from stage 2: position embedding interpolated, ITC + ITM
  _run("train", "--config", f"{cfg}:finetune_coco", "--workdir", str(runs / "ft_coco"), *common,
       *coco_data, f"--config.init_from={runs / 'stage2'}", "--config.total_steps=1")
  ft = _state(runs / "ft_coco")
  deit_ref = run_torch(TORCH_INTERPOLATE, {"pos_deit": deit_sd["pos_embed"], "grid": g})
  ft_ref = run_torch(TORCH_INTERPOLATE, {"pos_online": s2["params"]["vit"]["pos_embed"],
                                         "pos_momentum": s2["params_m"]["vit"]["pos_embed"],
                                         "grid": RES_FT // PATCH})
  np.testing.assert_allclose(s1["params"]["vit"]["pos_embed"], deit_ref["deit"], atol=1e-5)
  np.testing.assert_allclose(ft["params"]["vit"]["pos_embed"], ft_ref["online"], atol=1e-4)
  np.testing.assert_allclose(ft["params_m"]["vit"]["pos_embed"], ft_ref["momentum"], atol=1e-4)
  mf = _metrics(runs / "ft_coco")
  assert [r["step"] for r in mf] == [1] and mf[0]["loss_mlm"] == 0.0   # new schedule; no MLM
  assert mf[0]["loss_itc"] > 0 and mf[0]["loss_itm"] > 0 and "nva_replaced_frac" in mf[0]
  assert mf[0]["lr"] == pytest.approx(1e-5)
  assert int(ft["queues"]["ptr"]) == (3 * BATCH + BATCH) % QUEUE    # queues carried ...
  assert np.sum(ft["queues"]["idx"] == -100) == QUEUE - BATCH       # ... the id queue reset

  # ---- NTVA fine-tuning from stage 2 on NegCLIP's TSV: text and visual negatives
  _run("train", "--config", f"{cfg}:finetune_nta+ntva", "--workdir", str(runs / "ft_ntva"), *common,
       f"--config.data.paths=('{negclip_tsv}',)", f"--config.data.image_root={negclip_tsv.parent}",
       f"--config.init_from={runs / 'stage2'}", "--config.total_steps=1")
  mn = _metrics(runs / "ft_ntva")[0]
  assert mn["loss_mlm"] == 0.0 and {"itm_acc_nva", "itm_acc_nta"} <= set(mn)

  # ---- evaluation from the fine-tuned run and from the converted ALBEF folder
  benches = ["--bench", "valse,winoground,retrieval_coco,aro", "--aro_tasks", "coco_order",
             "--aro_perturbation", "fallback", "--aro_seeds", "1", "--data_dir", str(data),
             "--vocab", str(minilm_dir), "--batch_size", "32", "--k_test", "4"]
  for name, ckpt in (("run", runs / "ft_ntva"), ("albef", w / "albef")):
    _run("eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / f"eval_{name}"), *benches)
    results = json.loads((tmp_path / f"eval_{name}" / "results.json").read_text())
    assert set(results["results"]) == {"valse", "winoground", "retrieval_coco", "aro"}
    for bench, r in results["results"].items():
      assert r["headline"] and all(0.0 <= v <= 100.0 for v in r["headline"].values()), bench
  assert json.loads((tmp_path / "eval_albef" / "results.json").read_text())["meta"][
      "use_dictionary"] is False
  cfg_a, params_a, _ = checkpoint.load_params(str(w / "albef"))
  assert cfg_a.model.vit.image_size == RES_FT
  np.testing.assert_allclose(np.asarray(params_a["itm_head"]["kernel"]), albef_sd["itm_head.weight"].T)
