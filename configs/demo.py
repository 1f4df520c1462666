r"""Demo: a small NAS model on the built-in synthetic world, stage 1 then stage 2, on a laptop CPU.

  python -m nas_jax.train --config configs/demo.py --workdir runs/demo

Stage 1 (VD) runs in <workdir>/stage1, then stage 2 (VD + NVA) continues from it in
<workdir>/stage2; each ends with the synthetic evaluation table (held-out retrieval, ITM accuracy,
and the fine-grained suite: attribute swap, relation swap, counting, existence, Winoground-style).
About 10 minutes on 2 CPU cores. `configs/demo.py:tiny` is a one-minute smoke version (tests, CI).
"""

from nas_jax import config_lib
from nas_jax.data import synthetic


def get_config(arg: str | None = None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/demo.py:{arg}: use configs/demo.py or configs/demo.py:tiny")
  tiny = arg == "tiny"
  c = config_lib.base_config()
  c.stage = 1
  res = 32 if tiny else 48
  width = 64 if tiny else 128
  c.model.vit.update(image_size=res, patch_size=8, hidden_size=width, num_layers=2 if tiny else 4,
                     num_heads=4, mlp_dim=4 * width)
  c.model.bert.update(vocab_size=synthetic.vocab_size(), hidden_size=width,
                      num_layers=2 if tiny else 4, fusion_layer=1 if tiny else 2, num_heads=4,
                      intermediate_size=4 * width, max_position_embeddings=64)
  # From scratch, BERT's 0.02 init leaves every caption (and image) with nearly the same [CLS]
  # feature and ITC stalls for hundreds of steps; a larger init breaks the symmetry at once.
  c.model.vit.init_std = 0.1
  c.model.bert.initializer_range = 0.1
  c.model.embed_dim = 64
  c.model.dictionary.size = 64 if tiny else 256
  c.model.dictionary.init = "data"   # N(0, 1) codes sit far from ReLU features: most never win.
  c.itc.queue_size = 512 if tiny else 1024
  c.data.source = "synthetic"
  c.data.vocab = "synthetic"
  c.data.image_size = res
  c.data.batch_size = 32 if tiny else 64
  c.data.max_text_len = 24
  c.data.randaugment = False
  c.num_epochs = 1
  c.total_steps = 12 if tiny else 600
  c.stage2_steps = 4 if tiny else 150
  # Stage 2 restarts AdamW: a gentler peak keeps stage 1's matching head while NVA negatives join.
  c.stage2_lr = 1e-4
  # The synthetic background is one colour, so one code covers most of every image: replacing all
  # patches that carry a primary code (nva.scope='image') would replace ~98% of them; the default
  # 'primary' replaces only the top-S patches.
  c.itc.alpha_warmup_steps = 4 if tiny else 200
  c.optim.update(lr=5e-4, min_lr=1e-5, warmup_steps=2 if tiny else 50)
  c.log_every = 5 if tiny else 50
  c.checkpoint.every = 0
  c.eval.batch_size = 64
  c.eval.k_test = 8
  return c
