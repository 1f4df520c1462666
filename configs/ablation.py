r"""The paper's ablation (Table 4) in miniature on the synthetic world: every run's training config.

One command runs the whole ablation (3 seeds, 6 runs at a time on one GPU; docs/ABLATION.md):

  python -m nas_jax.ablate --workdir runs/ablation --seeds 3 --parallel 6 --doc docs/ABLATION.md

It starts, per seed, the two stage-1 runs and then the five continuations of Table 4's rows, each
as `python -m nas_jax.train --config configs/ablation.py:RUN[,tiny] --workdir DIR --config.seed=S
[--config.init_from=STAGE1_DIR]`. RUN is one of RUNS below:

  stage1_albef   stage 1 without the visual dictionary (plain ALBEF: ITC + MLM + ITM)
  stage1_vd      stage 1 with the visual dictionary (NAS stage 1)
  albef          ALBEF row: continues stage1_albef, no VD, no NVA
  vd             +VD row: continues stage1_vd, no NVA
  vd_nva         +VD+NVA row (NAS stage 2): continues stage1_vd with NVA negatives
  nta            +NTA row: continues stage1_vd with text hard negatives (I, T_fg)
  ntva           +NTVA row: continues stage1_vd with both

The scale (the default): ViT and BERT of width 256, 4 layers each (BERT: 2 text + 2 fusion), 48 px
scenes in 8 px patches, VD of 512 codes, batch 128, bfloat16; stage 1 STAGE1_STEPS steps, each
continuation CONTINUATION_STEPS steps. `,tiny` is a CPU-sized smoke version (16 px, width 32, a
handful of steps) for tests/test_ablate.py; it trains nothing.
"""

from nas_jax import config_lib
from nas_jax.data import synthetic

STAGE1_STEPS = 2000
CONTINUATION_STEPS = 500
TINY_STAGE1_STEPS = 2
TINY_CONTINUATION_STEPS = 2

# run -> (its stage-1 run or None, visual dictionary, NVA negatives, text hard negatives).
RUNS = {
    "stage1_albef": (None, False, False, False),
    "stage1_vd": (None, True, False, False),
    "albef": ("stage1_albef", False, False, False),
    "vd": ("stage1_vd", True, False, False),
    "vd_nva": ("stage1_vd", True, True, False),
    "nta": ("stage1_vd", True, False, True),
    "ntva": ("stage1_vd", True, True, True),
}
# Table 4's rows (label, run), in the paper's order plus NAS stage 2 (+VD+NVA).
ROWS = (
    ("ALBEF (no VD)", "albef"),
    ("+VD", "vd"),
    ("+VD+NVA", "vd_nva"),
    ("+VD+NTA", "nta"),
    ("+VD+NTA+NVA (NTVA)", "ntva"),
)
TINY_ROWS = ("vd", "ntva")   # Two rows from one stage-1 run: NVA and NTA both exercised.


def continuation(c, steps: int) -> None:
  """The continuation flags, all in one place: how a row's run goes on from its stage-1 checkpoint
  (`--config.init_from`, passed by nas_jax.ablate). As the paper (one schedule over 29 + 1 epochs),
  it continues stage 1's step counter, AdamW state and learning-rate schedule
  (`continue_schedule`); stage 1's schedule spans both stages (`optim.schedule_steps`), so the
  continuation trains the end of one cosine. `total_steps` counts this run's steps."""
  c.stage = 2
  c.continue_schedule = True
  c.total_steps = steps


def _parse(arg: str | None) -> tuple[str, bool]:
  parts = [p for p in (arg or "").split(",") if p]
  tiny = "tiny" in parts
  runs = [p for p in parts if p != "tiny"]
  if len(runs) != 1 or runs[0] not in RUNS or len(parts) != len(runs) + tiny:
    raise ValueError(f"configs/ablation.py:{arg}: use configs/ablation.py:RUN or :RUN,tiny with RUN "
                     f"one of {', '.join(RUNS)}")
  return runs[0], tiny


def get_config(arg: str | None = None):
  run, tiny = _parse(arg)
  stage1, use_vd, use_nva, use_nta = RUNS[run]
  c = config_lib.base_config()
  c.stage = 1
  res = 16 if tiny else 48
  width = 32 if tiny else 256
  layers = 2 if tiny else 4
  c.model.vit.update(image_size=res, patch_size=8, hidden_size=width, num_layers=1 if tiny else layers,
                     num_heads=2 if tiny else 8, mlp_dim=4 * width)
  c.model.bert.update(vocab_size=synthetic.vocab_size(), hidden_size=width, num_layers=layers,
                      fusion_layer=layers // 2, num_heads=2 if tiny else 8,
                      intermediate_size=4 * width, max_position_embeddings=64)
  # As configs/demo.py: from scratch, a larger init breaks the symmetry of the [CLS] features, and
  # data-initialised codes all get used.
  c.model.vit.init_std = 0.1
  c.model.bert.initializer_range = 0.1
  c.model.embed_dim = 16 if tiny else 128
  c.model.use_dictionary = use_vd
  c.model.dictionary.size = 16 if tiny else 512
  c.model.dictionary.init = "data"
  if not tiny:
    c.model.dtype = "bfloat16"
    c.model.vit_attention = "auto"
  c.data.source = "synthetic"
  c.data.vocab = "synthetic"
  c.data.image_size = res
  c.data.batch_size = 8 if tiny else 128
  c.data.max_text_len = 24
  c.data.randaugment = False
  c.data.num_workers = 0 if tiny else 2
  # Enough records that stage 1 never repeats one (2000 x 128 = 256k).
  c.data.synthetic.num_train = 1000 if tiny else 1_000_000
  c.itc.queue_size = 16 if tiny else 4096
  c.itc.alpha_warmup_steps = 0 if tiny else 500
  c.itm.hard_negative_groups = 1      # The same negatives whatever the device count.
  c.itm.text_negatives = use_nta
  c.nva.enabled = use_nva
  c.nva.scope = "primary"   # One background code covers most of a synthetic image (configs/demo.py).
  # The demo's 5e-4 at width 128, scaled ~1 / width. Tiny: stage 1 with the continuation's constants,
  # so that a continuation without new negatives compiles to the same program (a cache hit).
  c.optim.update(lr=1e-4 if tiny else 3e-4, min_lr=1e-5, warmup_steps=1 if tiny else 100)
  c.total_steps = TINY_STAGE1_STEPS if tiny else STAGE1_STEPS
  c.optim.schedule_steps = c.total_steps + (TINY_CONTINUATION_STEPS if tiny else CONTINUATION_STEPS)
  c.num_epochs = 1
  c.log_every = 1 if tiny else 20
  c.checkpoint.every = 0 if tiny else 500
  c.checkpoint.async_save = not tiny
  c.eval_every = 0          # eval.json is written once, at the end: nas_jax.ablate's "run done".
  c.data.synthetic.bench_per_subset = 20 if tiny else 200   # Once train's evaluation reads it.
  c.eval.batch_size = 64 if tiny else 256
  c.eval.k_test = 8 if tiny else 16
  if stage1 is not None:
    continuation(c, TINY_CONTINUATION_STEPS if tiny else CONTINUATION_STEPS)
  return c
