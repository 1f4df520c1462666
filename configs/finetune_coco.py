r"""Fine-tuning on COCO (Karpathy train) at 384 px — NAS(NVA) "coco" (Tables 2, 3, 9, 10).

ALBEF's retrieval fine-tuning recipe (`config_lib.finetune_base`: ITC + ITM, lr 1e-5 → 1e-6 cosine,
5 epochs, batch 256, crops of area 0.5-1, the id queue that makes every caption of an image a
positive) with the visual dictionary and NVA negatives in FGITM. The position embedding is
interpolated 256 → 384 when starting from a 256-px run or conversion (bicubic, as ALBEF).

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
  c.model.use_dictionary = arg != "albef"
  c.data.source = "albef_json"
  return c
