"""model.fp8: the transformer layers' Dense matmuls in FP8 (nas_jax/models/fp8.py): the matmul
itself, the switch's reach in the whole model, its config key. A ViT block and a BERT fusion layer
against bfloat16: tests/test_vit.py, tests/test_bert.py.

On the CPU the FP8 products are computed from the same float8 values in higher precision, so these
tests check the numbers FP8 gives; that XLA turns them into cuBLASLt FP8 gemms is a GPU matter
(docs/PERF.md). Tolerances: float8_e4m3fn keeps 3 mantissa bits, so each operand entry is rounded
by up to 2^-4 (6 %) of itself; a product of two such operands lands a few per cent RMS from the
exact one (measured: 3.7 % on Gaussian data). Gradients add float8_e5m2 (2 mantissa bits: up to
2^-3) on the output gradient (measured: 6 %).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_utils import relative_error, tiny_config

from nas_jax import checkpoint, config_lib
from nas_jax.models import fp8
from nas_jax.models.nas import NASModel

DENSE_DIMS = (((2,), (0,)), ((), ()))


def _fp8_values(x, dtype):
  """x rounded to `dtype` under the same per-tensor max scale, back in float32 (the reference)."""
  scale = np.max(np.abs(x)) / float(jnp.finfo(dtype).max)
  return (x / scale).astype(dtype).astype(np.float32) * scale


def test_matmul_is_the_product_of_fp8_rounded_operands_and_its_gradients_too():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 8, 64)).astype(np.float32)
  w = (rng.normal(size=(64, 32)) * 0.05).astype(np.float32)
  g = (rng.normal(size=(4, 8, 32)) * 1e-6).astype(np.float32)   # tiny: the scale adapts

  @jax.jit
  def run(x, w):
    dot = lambda x, w: fp8.dot_general(x, w, DENSE_DIMS)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
    return dot(x, w), jax.grad(loss(dot), (0, 1))(x, w), jax.grad(loss(jnp.matmul), (0, 1))(x, w)

  y, grads, exact = run(x, w)
  x8, w8 = _fp8_values(x, fp8.E4M3), _fp8_values(w, fp8.E4M3)
  np.testing.assert_allclose(np.asarray(y), x8 @ w8, rtol=1e-5, atol=1e-5)
  assert 0.01 < relative_error(y, x @ w) < 0.08
  np.testing.assert_allclose(np.asarray(grads[0]), _fp8_values(g, fp8.E5M2) @ w8.T, rtol=1e-5,
                             atol=1e-12)
  for got, ref in zip(grads, exact):
    assert 0.01 < relative_error(got, ref) < 0.12
  with pytest.raises(ValueError, match="nn.Dense's"):
    fp8.dot_general(x, w, (((1,), (0,)), ((), ())))


def _tiny_model(scan: bool, fp8_on: bool):
  """(the tiny NAS model in bfloat16, init inputs: a key, images, ids, mask)."""
  c = tiny_config(**{"model.fp8": fp8_on, "model.scan_layers": scan, "model.dtype": "bfloat16"})
  res, length = c.model.vit.image_size, 8
  return NASModel(c.model), (jax.random.key(0), jnp.zeros((2, res, res, 3)),
                             jnp.zeros((2, length), jnp.int32), jnp.ones((2, length), jnp.int32))


def _kernels_in_layers(params) -> int:
  """Dense kernels inside the unrolled ViT blocks and BERT layers."""
  layers = [sub for tower, prefix in (("vit", "blocks_"), ("bert", "layer_"))
            for name, sub in params[tower].items() if name.startswith(prefix)]
  return sum(path[-1].key == "kernel"
             for path, _ in jax.tree_util.tree_flatten_with_path(layers)[0])


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "stacked"])
def test_switch_leaves_every_variable_as_it_is_and_covers_exactly_the_layers(monkeypatch, scan):
  """Same collections, names, shapes and dtypes with fp8 on or off (checkpoints, conversions and
  the optimizer depend on it). Unrolled, the FP8 matmuls are exactly the Dense layers of the ViT
  blocks and BERT's text and fusion layers: no embedding, projection, head or dictionary. Scanned,
  the backward pass traces too (the FP8 matmul's own gradient inside nn.scan)."""
  calls = []
  real = fp8.dot_general
  monkeypatch.setattr(fp8, "dot_general", lambda *a, **k: calls.append(1) or real(*a, **k))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  model, inputs = _tiny_model(scan, False)
  off = jax.eval_shape(model.init, *inputs)
  assert not calls
  model, inputs = _tiny_model(scan, True)
  on = jax.eval_shape(model.init, *inputs)
  assert shapes(on) == shapes(off)
  if not scan:
    # ViT: qkv, proj, fc1, fc2 per block; BERT: 6 per text layer, 10 per fusion layer.
    assert len(calls) == _kernels_in_layers(off["params"]) == 2 * 4 + 1 * 6 + 1 * 10
    return
  assert calls
  loss = lambda p, stats: sum(jnp.sum(out.astype(jnp.float32)) for out in model.apply(
      {"params": p, "batch_stats": stats}, *inputs[1:]))
  grads = jax.eval_shape(jax.grad(loss), on["params"], on["batch_stats"])
  assert shapes(grads) == shapes(on["params"])


def test_validate_takes_a_bool_and_a_checkpoint_restores_across_the_switch():
  for value in (False, True):
    config_lib.validate(tiny_config(**{"model.fp8": value}))
  with pytest.raises(config_lib.ConfigError, match=r"config.model.fp8=None: use True or False"):
    config_lib.validate(tiny_config(**{"model.fp8": None}))
  saved = checkpoint.config_to_dict(tiny_config(**{"model.fp8": False}))
  checkpoint.check_compatible(saved, tiny_config(**{"model.fp8": True}), "a bf16 run")
