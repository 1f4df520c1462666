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
  if arg not in (None, "", "albef"):
    raise ValueError(f"configs/finetune_coco.py:{arg}: use no suffix (NAS) or ':albef'")
  c = config_lib.finetune_base()
  c.nva.enabled = arg != "albef"
  c.itc.use_id_queue = True
  c.itc.alpha_warmup_steps = -1
  c.data.source = "albef_json"
  return c
