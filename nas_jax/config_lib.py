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


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` → its `get_config(arg)` (the CLIs' --config outside absl)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (e.g. configs/demo.py)")
  module_spec = importlib.util.spec_from_file_location("nas_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


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
  ))
  c.model.dtype = 'float32'          # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  c.model.attention = 'xla'          # 'xla' | 'cudnn' | 'auto' (cudnn on GPU with bf16, else xla).
                                     # cuDNN has no attention-probability dropout (BERT's 0.1).
  c.model.vit_attention = ''         # Override for the ViT only ('' = model.attention); the
                                     # ViT has no dropout, so 'auto' there changes nothing but speed.
  c.model.remat = False              # Rematerialise each transformer layer.
  c.model.scan_layers = True         # Each layer stack (ViT blocks, BERT text / fusion layers) as
                                     # one nn.scan over stacked params; False: unrolled (same
                                     # function; models/layer_stack.py, docs/PERF.md).

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
  ))
  c.num_epochs = 29
  c.total_steps = -1      # -1: derived from num_epochs and data.num_train_samples.
  c.accum_steps = 1
  c.stage2_steps = 0      # >0: continue with a stage-2 (NVA) run of this many steps in <workdir>/stage2.
  c.stage2_lr = 0.0       # 0: that stage 2 continues stage 1's schedule; >0: it restarts AdamW
                          # with a warm-up to this peak instead.
  c.nonfinite = 'stop'    # 'stop' or 'skip' a step whose loss is not finite.

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
          bench_per_subset=100,  # Cases per subset of the synthetic fine-grained suite.
      )),
  ))

  # ---------------------------------------------------------------- infrastructure
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.init_from = ''           # Another run's workdir, or `nas_jax.convert` folders (comma-separated).
  c.continue_schedule = False  # With init_from=<a run>: continue its step, AdamW state and
                               # learning-rate schedule (stage 2 after stage 1; nas_jax/run_plan.py).
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
  c.log_every = 50
  c.eval_every = 0           # 0: only at the end.
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True,
      batch_size=64,
      max_text_len=40,
      k_test=16,
      score='itm',             # 'itm' (logit difference) or 'itc' (cosine).
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
