"""FSDP on 8 simulated CPU devices: the mesh data×fsdp = 2×4 gives the same losses and
parameters over several steps as pure data parallelism (8×1), and large leaves really are split.

The tiny model has no leaf of `sharding.FSDP_MIN_SIZE` (65,536) elements, so the threshold is
lowered to 1,024 here: every matrix (and the VD codebook) is split, biases and norms are not. The
steps run with scanned layer stacks ([L, ...], model.scan_layers=True), the harder layout: a stack
is split as each of its layers would be, never along the layer axis. The sharding rules of the
default unrolled layout are checked on the abstract state (no compile).
"""

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow   # Three 8-device compiles of the full stage-2 step.

MIN_SIZE = 1024

from step_utils import assert_params_close, build, fixed_batch, tiny_config

from nas_jax.models import layer_stack


def _config(fsdp: int, scan_layers: bool = True):
  # Stage 2 (VD + NVA + text negatives): every pair group and both VD paths are exercised.
  return tiny_config(**{"mesh.fsdp": fsdp, "nva.enabled": True, "itm.text_negatives": True,
                        "optim.lr": 1e-3, "optim.warmup_steps": 1, "total_steps": 20,
                        "itm.hard_negative_groups": 8, "model.scan_layers": scan_layers})


def _build_sharded(c, init: bool = True):
  """(initial state, step fn, 8-device mesh, state shardings with the lowered FSDP threshold);
  init=False: the state's shapes only."""
  from nas_jax import sharding
  _, _, _, state, step = build(c, num_groups=8, init=init)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:8])
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sharding, "FSDP_MIN_SIZE", MIN_SIZE)
    state_sh = sharding.state_shardings(jax.eval_shape(lambda: state) if init else state, mesh)
  return state, step, mesh, state_sh


def _run(fsdp: int, batch, steps: int = 3):
  from nas_jax import sharding
  state, step, mesh, state_sh = _build_sharded(_config(fsdp))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sh)
    f = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                out_shardings=(state_sh, None), donate_argnums=0)
    metrics = []
    for _ in range(steps):
      state, m = f(state, sharding.host_to_global(batch, mesh))
      metrics.append(jax.device_get(m))
  return mesh, jax.device_get(state), metrics


# Session scope: a whole run, made once per xdist worker however it interleaves modules.
@pytest.fixture(scope="session")
def runs():
  assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
  batch = fixed_batch(_config(1))
  return {f: _run(f, batch) for f in (1, 4)}   # (2 adds a compile, not a code path.)


@pytest.mark.parametrize("fsdp", [4])
def test_fsdp_matches_data_parallel(runs, fsdp):
  _, s_dp, m_dp = runs[1]
  mesh, s_f, m_f = runs[fsdp]
  assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
  for a, b in zip(m_dp, m_f):
    for k in ("loss", "loss_itc", "loss_mlm", "loss_itm", "itm_acc", "grad_norm",
              "vd_perplexity", "nva_replaced_frac"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=2e-5, err_msg=k)
  # Reduce-scatters sum in another order. AdamW's normalised steps (~lr = 1e-3 per parameter)
  # amplify that rounding where a gradient is near zero: a few elements may differ by a few % of
  # one step; 99% agree to 1e-6.
  assert_params_close(s_f.params, s_dp.params, atol=5e-5)
  assert_params_close(s_f.params_m, s_dp.params_m, atol=5e-5)
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(s_dp.params)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(s_f.params)])
  assert np.mean(np.abs(a - b) > 1e-6) < 1e-2
  # Adam moments: each leaf to 0.1% of its own largest value (gradient elements near zero carry
  # the reduction-order rounding), attention key biases (pure rounding noise) left out. The VD
  # gate's dense layer to 1%: its two logits go through a LayerNorm over 2 values, which is ±1
  # except near a tie, so its gradient comes from the few near-tie patches and carries their
  # rounding (scanned layer stacks sum in yet another order: 0.2% seen, 0.05% unrolled).
  flat_dp = jax.tree_util.tree_flatten_with_path(s_dp.opt_state)[0]
  for (path, a), b in zip(flat_dp, jax.tree.leaves(s_f.opt_state)):
    name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
    if "['key']['bias']" in name:
      continue
    if "['qkv']['bias']" in name:
      d = a.shape[-1] // 3
      a, b = a[..., np.r_[0:d, 2 * d:3 * d]], b[..., np.r_[0:d, 2 * d:3 * d]]
    tol = 1e-2 if "['gate_dense']" in name else 1e-3
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * float(np.max(np.abs(a), initial=0)),
                               err_msg=name)
  np.testing.assert_allclose(s_f.batch_stats["dictionary"]["codebook"],
                             s_dp.batch_stats["dictionary"]["codebook"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s_f.queues["image"], s_dp.queues["image"], rtol=1e-4, atol=1e-5)


def _assert_large_leaves_split(state, specs) -> tuple[int, int]:
  """Every leaf whose one-layer slice is large is split over fsdp, no other; a stack never along
  its layer axis; queues replicated. Returns (leaves split, stacked leaves)."""
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  split = stacked = 0
  for part in ("params", "params_m", "opt_state", "batch_stats"):
    leaves = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
    for (path, leaf), spec in zip(leaves, jax.tree.leaves(getattr(specs, part), is_leaf=is_spec)):
      name = part + jax.tree_util.keystr(path)
      layer = layer_stack.layer_shape(path, np.shape(leaf))   # One layer's slice of a stack.
      big = np.prod(layer) >= MIN_SIZE and any(d % 4 == 0 for d in layer)
      assert ("fsdp" in tuple(spec)) == big, (name, np.shape(leaf), spec)
      if layer_stack.is_stacked(path):
        stacked += 1
        assert len(spec) == 0 or spec[0] is None, (name, spec)   # Never the layer axis.
      split += big
  assert "fsdp" in tuple(specs.batch_stats["dictionary"]["codebook"])
  assert all(tuple(s) == () for s in jax.tree.leaves(specs.queues, is_leaf=is_spec))
  return split, stacked


def test_fsdp_shards_large_leaves_only():
  """The rules on the scanned layout's state (the steps above run under exactly these shardings:
  they are the jitted step's in_shardings and out_shardings)."""
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  state, _, _, shardings = _build_sharded(_config(4), init=False)
  _, _, _, shardings_dp = _build_sharded(_config(1), init=False)
  specs_dp = jax.tree.map(lambda x: x.spec, shardings_dp)
  assert all("fsdp" not in tuple(s) for s in jax.tree.leaves(specs_dp, is_leaf=is_spec))
  split, stacked = _assert_large_leaves_split(state, jax.tree.map(lambda x: x.spec, shardings))
  assert split > 40 and stacked > 40


def test_fsdp_rules_of_the_unrolled_layout():
  state, _, _, shardings = _build_sharded(_config(4, scan_layers=False), init=False)
  specs = jax.tree.map(lambda x: x.spec, shardings)
  split, stacked = _assert_large_leaves_split(state, specs)
  assert split > 40 and stacked == 0
