r"""NAS stage 2: one epoch with negative visual augmentation (VD + NVA), from a stage-1 checkpoint.

  python -m nas_jax.train --config configs/stage2.py --workdir runs/stage2 \
      --config.init_from=runs/stage1 --config.data.paths="('/data/coco.json', ...)" \
      --config.data.vocab=/models/bert-base-uncased

NVA: top 30% patches by S = 0.5·cos(t_cls, v_i) + 0.5·cos(v_cls, v_i); each of their codes replaced
by one of its 3 nearest codes; (I_fg, T) joins FGITM as a negative.
"""

from nas_jax import config_lib


def get_config(arg: str | None = None):
  if arg not in (None, ""):
    raise ValueError(f"configs/stage2.py:{arg}: this config takes no suffix")
  c = config_lib.base_config()
  c.stage = 2
  c.model.dtype = "bfloat16"
  c.model.vit_attention = "auto"  # cuDNN flash attention on GPUs (same function; docs/PERF.md).
  c.model.use_dictionary = True
  c.nva.enabled = True
  c.num_epochs = 1
  c.data.source = "albef_json"
  c.data.vocab = ""
  c.data.batch_size = 512
  c.data.num_workers = 8
  c.itc.alpha_warmup_steps = 0   # α is already at 0.4 after stage 1's first epoch.
  c.checkpoint.every = 2000
  return c
