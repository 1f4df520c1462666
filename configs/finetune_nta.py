r"""Fine-tuning on text-augmented COCO (NegCLIP's hard-negative captions) — NAS(NTA) / NAS(NTVA).

The recipe of configs/finetune_coco.py (ITC + ITM at 384 px, the id queue: NegCLIP's rows are COCO
captions, five per image) where each sample also carries a text hard negative T_fg (a random element
of the row's `neg_caption`) and FGITM gets the extra negative pair (I, T_fg). `:ntva` also turns NVA
on (the paper's best model).

  python -m nas_jax.train --config configs/finetune_nta.py:ntva --workdir runs/ft_ntva \
      --config.init_from=runs/stage2 --config.data.paths="('/data/train_neg_clip.tsv',)" \
      --config.data.image_root=/data --config.data.vocab=/models/bert-base-uncased
"""

from nas_jax import config_lib


def get_config(arg: str | None = None):
  if arg not in (None, "", "nta", "ntva"):
    raise ValueError(f"configs/finetune_nta.py:{arg}: use ':nta' (default) or ':ntva'")
  c = config_lib.finetune_base()
  c.itm.text_negatives = True
  c.nva.enabled = arg == "ntva"
  c.data.source = "negclip_tsv"
  return c
