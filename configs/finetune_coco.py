r"""Fine-tuning on COCO (Karpathy train) at 384 px — NAS(NVA) "coco" (Tables 2, 3, 9, 10).

ALBEF's retrieval fine-tuning recipe (lr 1e-5 → 1e-6 cosine, 5 epochs, batch 256, the id queue that
makes every caption of an image a positive) with the visual dictionary and NVA negatives in FGITM.
The position embedding is interpolated 256 → 384 when loading a 256-px checkpoint (bicubic, ALBEF).

  python -m nas_jax.train --config configs/finetune_coco.py --workdir runs/ft_coco \
      --config.init_from=runs/stage2 --config.data.paths="('/data/coco_train.json',)" \
      --config.data.image_root=/data/coco --config.data.vocab=/models/bert-base-uncased
  python -m nas_jax.eval --bench retrieval_coco --checkpoint runs/ft_coco --data_dir /data/coco

`:albef` turns NVA off (the ALBEF "coco" baseline).
"""

from nas_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.stage = 3
  c.model.dtype = "bfloat16"
  c.model.vit_attention = "auto"  # cuDNN flash attention on GPUs (same function; docs/PERF.md).
  c.model.vit.image_size = 384
  c.data.image_size = 384
  c.nva.enabled = arg != "albef"
  c.itc.use_id_queue = True
  c.itc.alpha_warmup_steps = -1
  c.num_epochs = 5
  c.optim.lr = 1e-5
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = 0
  c.data.source = "albef_json"
  c.data.vocab = ""
  c.data.batch_size = 256
  c.data.max_text_len = 30
  c.data.num_workers = 8
  c.checkpoint.every = 2000
  return c
