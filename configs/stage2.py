r"""NAS stage 2: one epoch with negative visual augmentation (VD + NVA), from a stage-1 checkpoint.

  python -m nas_jax.train --config configs/stage2.py --workdir runs/stage2 \
      --config.init_from=runs/stage1 --config.data.paths="('/data/coco.json', ...)" \
      --config.data.vocab=/models/bert-base-uncased

Stage 2 continues stage 1's run: its step counter, AdamW state and learning-rate schedule
(`continue_schedule`, so it trains where stage 1's cosine ended, ≈ 1e-5, as the paper's one
29 + 1-epoch schedule), with its codebook and queues.

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
  c.model.stacked_layout = True  # Few state arrays, unrolled layers: fastest on GPUs (PERF.md).
  c.mlm.max_masked = -1  # MLM heads on the masked tokens only; masking as ALBEF's for all but
                         # < 1e-5 of the texts (docs/RECIPE.md, PERF.md).
  c.model.use_dictionary = True
  c.nva.enabled = True
  c.num_epochs = 1
  c.data.source = "albef_json"
  c.data.vocab = ""
  c.data.batch_size = 512
  c.data.num_workers = 8
  c.continue_schedule = True
  c.checkpoint.every = 2000
  return c
