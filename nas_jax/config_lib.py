"""The one place that defines every configuration key and its default.

Config files in `configs/` start from `base_config()` and change what their stage needs, so an
unknown key (a typo on the command line) is always an error (`lock_config=True`). Defaults are the
paper's values (NAS, arXiv 2412.10029) with ALBEF's where the paper is silent.

Sections:
  model   architecture and numerics (ViT-B/16 + BERT-base split 6/6, visual dictionary)
  itc     contrastive loss: queues, momentum encoders, distillation
  mlm     masked language modelling
  itm     fine-grained image-text matching and its negatives
  nva     negative visual augmentation (stage 2)
  optim   AdamW with warm-up + cosine
  data    input pipeline
  mesh    device mesh ('data', 'fsdp')
  eval / checkpoint / logging
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  """A configuration value (or command-line flag) that cannot work; the message is one line that
  names the key, the value and what to use instead."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` → its `get_config(arg)` (the CLIs' --config outside absl)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (e.g. configs/demo.py)")
  module_spec = importlib.util.spec_from_file_location("nas_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def flat_config(d) -> dict:
  """{'a.b': value} of a nested config (a ConfigDict or its dict / JSON form)."""
  from flax import traverse_util
  return traverse_util.flatten_dict(d.to_dict() if hasattr(d, "to_dict") else d, sep=".")


def vit_b16(image_size: int = 256) -> ml_collections.ConfigDict:
  """DeiT-B/16 as ALBEF uses it."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,
      patch_size=16,
      hidden_size=768,
      num_layers=12,
      num_heads=12,
      mlp_dim=3072,
      layer_norm_eps=1e-6,
      init_std=0.02,       # timm's trunc-normal std (pretrained weights usually replace it).
      gelu='exact',        # MLP activation: 'exact' (DeiT) or 'tanh' (faster on GPU; PERF.md).
  ))


def bert_base() -> ml_collections.ConfigDict:
  """bert-base-uncased with ALBEF's split: layers [0, fusion_layer) text, the rest fusion."""
  return ml_collections.ConfigDict(dict(
      vocab_size=30522,
      hidden_size=768,
      num_layers=12,
      fusion_layer=6,
      num_heads=12,
      intermediate_size=3072,
      max_position_embeddings=512,
      type_vocab_size=2,
      layer_norm_eps=1e-12,
      hidden_dropout=0.1,
      attention_dropout=0.1,
      pad_token_id=0,
      initializer_range=0.02,
      gelu='exact',        # FFN / MLM-head activation: 'exact' (BERT) or 'tanh' (PERF.md).
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 1  # 1: VD, no NVA; 2: VD + NVA. Informational; the switches below decide.

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.vit = vit_b16(256)
  c.model.bert = bert_base()
  c.model.embed_dim = 256            # ITC projection size.
  c.model.temp = 0.07                # Initial ITC temperature.
  c.model.use_dictionary = True      # Fusion/ITM attends to VD tokens (NAS) or raw patches (ALBEF).
  c.model.dictionary = ml_collections.ConfigDict(dict(
      size=2048,          # m, number of codes.
      momentum=0.99,      # gamma of the EMA codebook update (paper eq. 2).
      gate=True,          # Learned quantized/continuous mix, as the authors' released code.
      input_proj=True,    # Linear -> LayerNorm -> ReLU before quantization.
      init='normal',      # 'normal' (paper) or 'data' (first batch's features).
      init_std=1.0,
      reuse_gate=True,    # NVA negative mixes with the positive's gate weights (authors' code).
      frozen=False,       # True: no eq. 2 update, the codebook keeps its loaded values (the
                          # authors' code after stage 1; the paper updates it throughout).
      distances='float32',  # Patch-to-code product: 'float32', or 'tf32' (TF32 tensor cores on
                            # NVIDIA GPUs, as the authors' PyTorch 1.8 on Ampere; near-tie codes
                            # may differ; models/dictionary.py, docs/PERF.md).
  ))
  c.model.dtype = 'float32'          # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  c.model.attention = 'xla'          # 'xla' | 'cudnn' | 'tokamax' | 'auto' (cudnn on GPU with
                                     # bf16, else xla). cuDNN and tokamax (optional extra; Triton
                                     # flash kernel on GPUs) have no attention-probability dropout
                                     # (BERT's 0.1).
  c.model.vit_attention = ''         # Override for the ViT only ('' = model.attention); the
                                     # ViT has no dropout, so 'auto' there changes nothing but speed.
  c.model.residual_dtype = 'float32' # The residual stream between the ViT / BERT layers (the
                                     # residual adds and LayerNorm outputs): 'float32' (ALBEF) or
                                     # 'bfloat16' (half their memory traffic; statistics stay
                                     # float32; docs/PERF.md). Same params either way.
  c.model.remat = False              # Rematerialise each transformer layer.
  c.model.scan_layers = False        # True: each layer stack (ViT blocks, BERT text / fusion
                                     # layers) as one nn.scan over stacked params: compiles ~4x
                                     # faster, but trains ~23% slower on an H200 (docs/PERF.md).
  c.model.stacked_layout = False     # True: the train state, checkpoints and conversions keep
                                     # the stacks' params stacked ([L, ...], as scan_layers does)
                                     # while the layers run unrolled: ~1/5 of the arrays to
                                     # dispatch and update per step (models/layer_stack.py).
  c.model.fp8 = False                # True: the Dense matmuls of the ViT blocks and the BERT text
                                     # and fusion layers (q/k/v, attention output, cross-attention,
                                     # MLP / FFN) in FP8 with per-tensor current scaling: cuBLASLt
                                     # FP8 gemms on Hopper, emulated elsewhere. Patch and token
                                     # embeddings, vision_proj / text_proj / itm_head, the MLM head
                                     # and the visual dictionary stay in model.dtype. Same params
                                     # and state either way (models/fp8.py, docs/PERF.md).

  # ---------------------------------------------------------------- objectives
  c.itc = ml_collections.ConfigDict(dict(
      queue_size=65536,
      momentum=0.995,     # EMA of the momentum encoders.
      alpha=0.4,          # Distillation weight, ramped 0 -> alpha over the first epoch.
      alpha_warmup_steps=-1,  # -1: one epoch (derived from data.num_train_samples / batch).
      temp_min=0.001,
      temp_max=0.5,
      use_id_queue=False,  # Retrieval fine-tuning: captions of the same image are positives.
  ))
  c.mlm = ml_collections.ConfigDict(dict(
      enabled=True,
      prob=0.15,
      mask_prob=0.8,
      random_prob=0.1,
      max_masked=0,   # At most this many masked tokens per text (BERT's max_predictions_per_seq;
                      # ALBEF has none: 0), so that the MLM heads run on those positions only
                      # (docs/PERF.md). -1: the smallest cap that changes the masking of < 1e-5
                      # of the texts at data.max_text_len (12 at 25 tokens).
  ))
  c.itm = ml_collections.ConfigDict(dict(
      text_negatives=False,   # (I, T_fg) pairs from the batch's hard-negative captions (NTA).
      hard_negative_groups=0,  # In-batch negatives drawn within this many batch slices; 0 = one
                               # per device (ALBEF). Fix it to make runs device-count invariant.
  ))
  c.nva = ml_collections.ConfigDict(dict(
      enabled=False,
      ratio=0.3,
      lam=0.5,
      k=3,
      scope='primary',    # 'primary': the ceil(ratio*N) top-S patches are replaced (the paper's
                          # "ratio of visual token replacement"); 'image': also every other patch
                          # of the image that carries one of their codes.
      norm='l2',          # How the k distances are normalised before softmax(1/d): 'l2' or 'max'.
  ))
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, mlm=1.0, itm=1.0))

  # ---------------------------------------------------------------- optimisation
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4,
      min_lr=1e-5,
      warmup_steps=1000,
      weight_decay=0.02,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=0.0,      # 0 = none (ALBEF uses none).
      schedule_steps=-1,  # Length of warm-up + cosine; -1: this run's steps. Longer: the run stops
                          # before the cosine's end and a continue_schedule run finishes it.
  ))
  c.num_epochs = 29
  c.total_steps = -1      # -1: derived from num_epochs and data.num_train_samples.
  c.accum_steps = 1
  c.stage2_steps = 0      # >0: continue with a stage-2 (NVA) run of this many steps in <workdir>/stage2.
  c.stage2_lr = 0.0       # 0: that stage 2 continues stage 1's schedule; >0: it restarts AdamW
                          # with a warm-up to this peak instead.
  c.nonfinite = 'stop'    # 'stop' or 'skip' a step whose loss is not finite.
  c.nonfinite_max_skips = 5  # With 'skip': stop with an error after this many skipped in a row.

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict(dict(
      source='synthetic',      # 'synthetic' | 'albef_json' | 'prepared' | 'negclip_tsv' | 'tfds'
      paths=(),                # Files of the source (tuples: lists cannot be overridden).
      image_root='',
      vocab='synthetic',       # 'synthetic' or a local BERT vocab.txt / model directory.
      batch_size=512,          # Global batch.
      image_size=256,
      max_text_len=25,
      num_train_samples=-1,    # -1: the source's length.
      num_workers=0,
      prefetch=2,
      randaugment=True,
      flip_swaps_left_right=True,
      max_error_rate=0.01,
      error_rate_min_records=1000,  # Records read before the error rate is checked.
      augment='auto',          # 'auto' (synthetic: 'flip', else 'full') | 'full' | 'flip' | 'none'.
      crop_scale_min=0.2,      # RandomResizedCrop area range (ALBEF: 0.2 pretrain, 0.5 retrieval).
      max_words=30,            # pre_caption word limit.
      read_threads=2,          # grain threads per process or worker (PIL/OpenCV release the GIL).
      image_dtype='float32',   # 'uint8': raw pixels, normalised on device (transforms.normalize_jax).
      tfds=ml_collections.ConfigDict(dict(
          name='', data_dir='', image_key='image', caption_key='captions/text',
          id_key='image/id')),
      synthetic=ml_collections.ConfigDict(dict(
          num_train=100_000,
          num_heldout=256,
          max_objects=3,
          p_existence=0.1,      # Train captions that are "there is (no) X" (held-out: none).
          p_duplicate=0.3,      # An object repeats an earlier (colour, shape): counting captions.
          p_and=0.25,           # Two single objects listed with "and" instead of related.
          bench_per_subset=200,  # Cases per subset of the synthetic suite in training.
      )),
  ))

  # ---------------------------------------------------------------- infrastructure
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.init_from = ''           # Another run's workdir, or `nas_jax.convert` folders (comma-separated).
  c.continue_schedule = False  # With init_from=<a run>: continue its step, AdamW state and
                               # learning-rate schedule (stage 2 after stage 1; nas_jax/run_plan.py).
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=1000, keep=3,
      async_save=True,         # Files are written in the background.
      snapshot=False,          # Single process: the save copies the state on the device and a
                               # writer thread hands the copy to orbax, so the loop never waits for
                               # the device → host transfer (needs the state's size once more on
                               # the device during a save). Measured: no blocking, but the same
                               # ~1.5 s of slower steps per save as orbax's own copy (PERF.md).
  ))
  c.compilation_cache = True   # Single process: JAX's persistent cache in <workdir>/jax_cache (a
                               # resumed run loads its programs); JAX_COMPILATION_CACHE_DIR wins.
  c.log_every = 50
  c.eval_every = 0           # 0: only at the end.
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True,
      benches=(),              # Benchmarks run in training (nas_jax/benchmarks/registry.py); () =
                               # the synthetic suite on synthetic data, none on real data.
      data_dir='',             # Their files, as for `python -m nas_jax.eval --data_dir`.
      batch_size=64,
      max_text_len=40,
      k_test=16,               # The synthetic suite's retrieval re-ranking shortlist.
      score='',                # '' = each benchmark's own (docs/EVALUATION.md), or one for all.
  ))
  return c


def finetune_base() -> ml_collections.ConfigDict:
  """ALBEF's 384-px retrieval fine-tuning recipe shared by configs/finetune_*.py: ITC + ITM (no
  MLM: the paper's supplement, ALBEF's and the authors' retrieval models), bfloat16, 5 epochs,
  lr 1e-5 → 1e-6 cosine without warm-up, batch 256, captions up to 30 tokens, random-resized crops
  of area (0.5, 1.0), and the id queue that makes every caption of an image a positive (COCO has
  five per image: as ITC negatives they would be false negatives)."""
  c = base_config()
  c.stage = 3
  c.model.dtype = "bfloat16"
  c.model.vit_attention = "auto"  # cuDNN flash attention on GPUs (same function; docs/PERF.md).
  c.model.stacked_layout = True  # Few state arrays, unrolled layers: fastest on GPUs (PERF.md).
  c.model.vit.image_size = 384
  c.data.image_size = 384
  c.mlm.enabled = False
  c.itc.use_id_queue = True
  c.data.crop_scale_min = 0.5
  c.num_epochs = 5
  c.optim.lr = 1e-5
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = 0
  c.data.vocab = ""
  c.data.batch_size = 256
  c.data.max_text_len = 30
  c.data.num_workers = 8
  c.checkpoint.every = 2000
  return c


# ============================================================================ validation
def _choices(c: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Keys with a fixed set of values → the values (read from the modules that interpret them)."""
  from nas_jax.benchmarks.common import SCORE_MODES
  from nas_jax.data.sources import SOURCES
  from nas_jax.models.activations import GELU_KINDS
  from nas_jax.models.attention import IMPLEMENTATIONS
  from nas_jax.models.dictionary import DISTANCES
  attention = IMPLEMENTATIONS + ("auto",)
  return {
      "nonfinite": ("stop", "skip"),
      "model.dtype": ("float32", "bfloat16"),
      "model.residual_dtype": ("float32", "bfloat16"),
      "model.attention": attention,
      "model.vit_attention": ("",) + attention,
      "model.vit.gelu": GELU_KINDS,
      "model.bert.gelu": GELU_KINDS,
      "model.dictionary.init": ("normal", "data"),
      "model.dictionary.distances": DISTANCES,
      "nva.scope": ("image", "primary"),
      "nva.norm": ("l2", "max"),
      "data.source": SOURCES,
      "data.augment": ("auto", "full", "flip", "none"),
      "data.image_dtype": ("float32", "uint8"),
      "eval.score": ("",) + tuple(SCORE_MODES),   # "": each benchmark's own score
  }


# Switches that must be True or False (ml_collections lets None through a bool field).
_BOOLEANS = ("model.fp8",)


def _get(c: ml_collections.ConfigDict, key: str):
  for part in key.split("."):
    c = c[part]
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key with a fixed set of values and every range a run depends on, before
  anything is built. Raises ConfigError with one line: the key, the bad value, what to use.

  Checks that need the devices (batch vs. the mesh) or the data (vocabulary size) happen where
  those are known (nas_jax.train).
  """
  c = config

  def fail(key: str, why: str):
    raise ConfigError(f"config.{key}={_get(c, key)!r}: {why}")

  for key, choices in _choices(c).items():
    if _get(c, key) not in choices:
      fail(key, f"use one of {', '.join(repr(x) for x in choices)}")
  for key in _BOOLEANS:
    if not isinstance(_get(c, key), bool):
      fail(key, "use True or False")

  def at_least(key: str, low: int, what: str = ""):
    value = _get(c, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      fail(key, f"must be an integer >= {low}{what}")

  d, m = c.data, c.model
  at_least("data.batch_size", 1, " (the global batch)")
  at_least("itc.queue_size", 1)
  if c.itc.queue_size % d.batch_size:
    near = max(1, round(c.itc.queue_size / d.batch_size)) * d.batch_size
    fail("itc.queue_size", f"must be a multiple of data.batch_size={d.batch_size} (every step "
         f"enqueues one whole batch); use e.g. --config.itc.queue_size={near}")
  at_least("accum_steps", 1, " (1 = no gradient accumulation)")
  at_least("nonfinite_max_skips", 1)
  at_least("log_every", 1)
  at_least("eval_every", 0, " (0 = only at the end)")
  at_least("checkpoint.every", 0, " (0 = only at the end and on SIGTERM)")
  at_least("checkpoint.keep", 1)
  at_least("itm.hard_negative_groups", 0, " (0 = one per device)")
  if c.itm.hard_negative_groups and d.batch_size % c.itm.hard_negative_groups:
    fail("itm.hard_negative_groups", f"must divide data.batch_size={d.batch_size}")
  at_least("stage2_steps", 0)
  at_least("data.num_workers", 0)
  at_least("data.max_text_len", 2, " ([CLS] and [SEP])")
  if d.max_text_len > m.bert.max_position_embeddings:
    fail("data.max_text_len", f"exceeds model.bert.max_position_embeddings="
         f"{m.bert.max_position_embeddings}")
  if c.total_steps <= 0:
    at_least("num_epochs", 1, " when total_steps <= 0 (the length is derived from epochs)")
  if d.image_size != m.vit.image_size:
    fail("data.image_size", f"differs from model.vit.image_size={m.vit.image_size}: make them "
         "agree")
  if m.vit.image_size % m.vit.patch_size:
    fail("model.vit.image_size", f"is not a multiple of model.vit.patch_size={m.vit.patch_size}")
  for tower in ("vit", "bert"):
    t = m[tower]
    if t.hidden_size % t.num_heads:
      fail(f"model.{tower}.num_heads", f"must divide model.{tower}.hidden_size={t.hidden_size}")
  if not 0 <= m.bert.fusion_layer <= m.bert.num_layers:
    fail("model.bert.fusion_layer", f"must lie in [0, model.bert.num_layers={m.bert.num_layers}]")
  if not 0.0 < c.nva.ratio <= 1.0:
    fail("nva.ratio", "must be in (0, 1] (the fraction of primary patches)")
  if not 1 <= c.nva.k < m.dictionary.size:
    fail("nva.k", f"need 1 <= k < model.dictionary.size={m.dictionary.size}")
  if c.nva.enabled and not m.use_dictionary:
    fail("nva.enabled", "needs config.model.use_dictionary=True (NVA replaces visual-dictionary "
         "codes)")
  mlm = c.mlm
  if not (0 <= mlm.prob <= 1 and mlm.mask_prob >= 0 and mlm.random_prob >= 0
          and mlm.mask_prob + mlm.random_prob <= 1):
    fail("mlm.prob", f"with mask_prob={mlm.mask_prob}, random_prob={mlm.random_prob}: need "
         "probabilities in [0, 1] with mask_prob + random_prob <= 1")
  at_least("mlm.max_masked", -1, " (0: no cap, -1: auto)")
  if not 0 <= d.max_error_rate <= 1:
    fail("data.max_error_rate", "must be in [0, 1]")
  for key in ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.grad_clip"):
    if not _get(c, key) >= 0:
      fail(key, "must be >= 0")
  at_least("optim.warmup_steps", 0)
  if c.optim.schedule_steps != -1:
    at_least("optim.schedule_steps", 1, " (or -1: the run's own length)")
  if c.continue_schedule and not c.init_from:
    fail("continue_schedule", "continues the run named by config.init_from, which is empty: "
         "set --config.init_from=<the stage-1 workdir> or --config.continue_schedule=False")
  if m.dictionary.frozen and m.dictionary.init == "data" and not c.init_from:
    fail("model.dictionary.frozen", "with dictionary.init='data' and no init_from the codebook "
         "would never be initialised: load one (init_from) or use init='normal'")
  from nas_jax.benchmarks import registry
  unknown = registry.unknown_names(c.eval.benches)
  if unknown:
    fail("eval.benches", f"has unknown benchmarks {unknown}: use {', '.join(registry.BENCHMARKS)}")
  at_least("mesh.fsdp", 1)
  if c.mesh.data != -1:
    at_least("mesh.data", 1, " (or -1: all remaining devices)")
