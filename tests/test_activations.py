"""The tanh GELU (models/activations.py): the same function as `jax.nn.gelu(approximate=True)`,
its own backward (eq. 2) equal to autodiff's to rounding, and a training step's forward GELU left
in the form XLA fuses into the matmul (the backward recomputes tanh from x, not from the forward's
intermediates)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax.models.activations import gelu, gelu_tanh


def _x(dtype):
  return jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_jax_tanh_gelu_bit_for_bit(dtype):
  x = _x(dtype)
  got, want = gelu(x, "tanh"), jax.nn.gelu(x, approximate=True)
  assert got.dtype == want.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_gradient_equals_autodiff():
  """float32: autodiff's gradient to 1e-5. bfloat16: within a bfloat16 rounding of the float32
  gradient, as autodiff in bfloat16 is (eq. 2 runs in float32, then rounds once)."""
  x = _x(jnp.float32)
  reference = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(x)
  ours = jax.grad(lambda x: jnp.sum(gelu_tanh(x)))(x)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  ours_b = jax.grad(lambda x: jnp.sum(gelu_tanh(x).astype(jnp.float32)))(xb)
  autodiff_b = jax.grad(
      lambda x: jnp.sum(jax.nn.gelu(x, approximate=True).astype(jnp.float32)))(xb)
  assert ours_b.dtype == jnp.bfloat16
  exact = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(xb.astype(jnp.float32))
  err = lambda g: float(jnp.max(jnp.abs(g.astype(jnp.float32) - exact)))
  assert err(ours_b) <= 2 ** -8 * 1.2 and err(ours_b) <= err(autodiff_b) + 1e-6


def test_training_step_keeps_one_forward_tanh_with_one_user():
  """In value_and_grad of dense → GELU, the forward's tanh feeds only the forward (the matmul
  epilogue pattern needs one user per intermediate) and the backward computes its own tanh, which
  XLA's CSE does not merge with the forward's: two tanh after optimisation."""
  w = jnp.ones((8, 16), jnp.float32) / 8
  x = jnp.linspace(-2, 2, 32, dtype=jnp.float32).reshape(4, 8)
  loss = lambda w: jnp.sum(gelu(x @ w, "tanh") ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(w)
  assert len(re.findall(r"= tanh ", str(jaxpr))) == 2, jaxpr
  compiled = jax.jit(jax.value_and_grad(loss)).lower(w).compile().as_text()
  assert len(re.findall(r"= f32\[[\d,]*\]\{?[\d,]*\}? tanh\(", compiled)) == 2, compiled
