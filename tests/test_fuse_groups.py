"""NASModel.fuse_groups: the FGITM / MLM pair groups in one fusion pass, where groups that read the
same image set share its keys and values (attention.ImageSets). It must be the same function as one
`fuse` per group — outputs and gradients — project each set once, and keep every device's rows on
that device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from step_utils import tiny_config

from nas_jax.models.nas import NASModel

B, L, SETS = 8, 8, 3
SET_OF_GROUP = (0, 1, 0, 2, 0)   # positive, negative image, negative text, NVA, text negative


def _model_and_inputs(**overrides):
  config = tiny_config(**overrides)
  model = NASModel(config=config.model)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, config.model.vit.image_size, config.model.vit.image_size, 3))
  ids = rng.integers(1, 50, (2, L)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), image.astype(np.float32), ids, np.ones_like(ids))
  d = config.model.bert.hidden_size
  tokens = (config.model.vit.image_size // config.model.vit.patch_size) ** 2 + 1   # odd: 17
  texts = [rng.normal(size=(B, L, d)).astype(np.float32) for _ in SET_OF_GROUP]
  lengths = rng.integers(2, L + 1, (len(SET_OF_GROUP), B))
  masks = [(np.arange(L)[None] < n[:, None]).astype(np.int32) for n in lengths]
  sets = [rng.normal(size=(B, tokens, config.model.vit.hidden_size)).astype(np.float32)
          for _ in range(SETS)]
  return model, params, texts, masks, sets


def _per_group(model, params, texts, masks, sets):
  return [model.apply(params, t, m, sets[s], method="fuse")
          for t, m, s in zip(texts, masks, SET_OF_GROUP)]


def _grouped(model, params, texts, masks, sets):
  return model.apply(params, texts, masks, sets, SET_OF_GROUP, method="fuse_groups")


def test_same_outputs_and_gradients_as_one_fuse_per_group():
  model, params, texts, masks, sets = _model_and_inputs()
  for got, want in zip(_grouped(model, params, texts, masks, sets),
                       _per_group(model, params, texts, masks, sets)):
    assert got.shape == (B, L, texts[0].shape[-1])
    np.testing.assert_allclose(got, want, atol=2e-5)

  weights = [np.random.default_rng(j).normal(size=t.shape).astype(np.float32)
             for j, t in enumerate(texts)]

  def loss(fuse, p, s):
    variables = {**params, "params": p}
    return sum(jnp.sum(o * w) for o, w in zip(fuse(model, variables, texts, masks, s), weights))

  got = jax.grad(lambda p, s: loss(_grouped, p, s), argnums=(0, 1))(params["params"], sets)
  want = jax.grad(lambda p, s: loss(_per_group, p, s), argnums=(0, 1))(params["params"], sets)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def _kv_products(model, params, texts, masks, sets):
  """Row counts of the products that read the image sets ([rows, Ni, Dv] left operands)."""
  jaxpr = jax.make_jaxpr(lambda p: _grouped(model, p, texts, masks, sets))(params)
  rows = []

  def visit(eqns):
    for e in eqns:
      lhs = e.invars[0].aval.shape if e.primitive.name == "dot_general" else ()
      if len(lhs) == 3 and lhs[1:] == sets[0].shape[1:]:
        rows.append(lhs[0])
      for value in e.params.values():   # Nested jaxprs (pjit, custom_vjp, remat, ...).
        for item in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(item, "jaxpr", item)
          if hasattr(inner, "eqns"):
            visit(inner.eqns)

  visit(jaxpr.jaxpr.eqns)
  return rows


def test_each_image_set_is_projected_once_per_layer():
  model, params, texts, masks, sets = _model_and_inputs()
  fusion_layers = model.config.bert.num_layers - model.config.bert.fusion_layer
  rows = _kv_products(model, params, texts, masks, sets)
  # Keys and values of 3 sets per fusion layer, each over B image rows (not 5 groups' rows).
  assert rows == [B] * (2 * SETS * fusion_layers)


def test_cudnn_path_pads_every_set_once(monkeypatch):
  """The cuDNN branch (checked on CPU through the xla kernel): the odd 17 image tokens of every
  set padded to 18 and masked, same outputs as XLA in bfloat16."""
  real = jax.nn.dot_product_attention
  seen = []

  def fake(q, k, v, *, key_value_seq_lengths=None, implementation=None, **kw):
    if implementation == "cudnn":
      seen.append(k.shape[1])
    return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  bf16 = {"model.dtype": "bfloat16", "model.vit_attention": "xla"}
  model, params, texts, masks, sets = _model_and_inputs(**bf16)
  cudnn, *_ = _model_and_inputs(**bf16, **{"model.attention": "cudnn"})
  seen.clear()   # Its initialisation's calls.
  want = _grouped(model, params, texts, masks, sets)
  assert not seen
  got = _grouped(cudnn, params, texts, masks, sets)
  assert set(seen) == {L, 18}   # text self-attention keys, padded image keys
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=0.1)


def test_rows_stay_on_their_devices():
  """With the batch split over 8 devices, the grouped pass moves no activations between them."""
  model, params, texts, masks, sets = _model_and_inputs()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  put = lambda xs: [jax.device_put(x, rows) for x in xs]
  fn = jax.jit(lambda p, t, m, s: _grouped(model, p, t, m, s))
  hlo = fn.lower(params, put(texts), put(masks), put(sets)).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective
