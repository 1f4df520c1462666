"""The whole NAS step: compiles, learns a fixed batch, momentum EMA, invariance to the device count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from step_utils import build, fixed_batch, tiny_config


@pytest.fixture(scope="module")
def stage2():
  """Tiny stage-2 config (VD + NVA + text negatives: every FGITM pair group is on)."""
  c = tiny_config(**{"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 1e-3,
                     "optim.warmup_steps": 1, "total_steps": 40})
  return c, fixed_batch(c)


def test_overfits_one_batch_and_momentum_follows_ema(stage2):
  _, batch = stage2
  # From-scratch BERT/ViT features start nearly identical across samples, so ITC needs many steps to
  # separate them; a constant, larger learning rate and a fast momentum make 30 steps enough to see
  # every loss term move. The queue holds exactly one batch.
  c = tiny_config(**{"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 2e-3,
                     "optim.warmup_steps": 1, "total_steps": 1000, "itc.queue_size": 32,
                     "itc.momentum": 0.5, "itc.alpha": 0.0})
  _, _, _, state, step = build(c)
  step = jax.jit(step)
  losses = []
  for i in range(30):
    before = state
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    if i == 0:
      first = jax.device_get(m)
    if i == 3:
      # Momentum encoders: params_m ← m·params_m + (1−m)·params, with the online params of the
      # previous step (ALBEF updates before the forward).
      mom = c.itc.momentum
      want = jax.tree.map(lambda pm, p: mom * pm + (1 - mom) * p, before.params_m,
                          {k: before.params[k] for k in before.params_m})
      got = state.params_m
      for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
      moved = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(jax.tree.leaves(before.params_m), jax.tree.leaves(got)))
      assert moved > 0
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  assert float(m["loss_mlm"]) < 0.8 * first["loss_mlm"]
  assert float(m["loss_itm"]) < 0.5 * first["loss_itm"]  # Learns at least the 1:4 label prior.
  assert set(m) >= {"loss_itc", "loss_mlm", "loss_itm", "itm_acc", "alpha", "temp", "lr",
                    "vd_perplexity", "vd_used_codes", "nva_replaced_frac", "grad_norm"}
  assert 0 < float(m["nva_replaced_frac"]) <= 1
  assert int(state.step) == 30
  # The queue pointer advanced by one batch per step, wrapping at queue_size.
  assert int(state.queues["ptr"]) == (30 * c.data.batch_size) % c.itc.queue_size
  # The temperature stays inside ALBEF's clamp.
  assert c.itc.temp_min <= float(m["temp"]) <= c.itc.temp_max


def test_queue_holds_momentum_features_in_order(stage2):
  c, batch = stage2
  _, _, _, state, step = build(c)
  step = jax.jit(step)
  b = c.data.batch_size
  feats = []
  for _ in range(3):
    prev = state
    state, _ = step(state, batch)
    # The enqueued image features are the momentum features of the batch (after this step's EMA).
    feats.append(np.asarray(state.queues["image"][(len(feats)) * b:(len(feats) + 1) * b]))
    assert int(state.queues["ptr"]) == len(feats) * b
    np.testing.assert_array_equal(np.asarray(state.queues["idx"][(len(feats) - 1) * b:len(feats) * b]),
                                  batch["image_id"])
    untouched = np.asarray(prev.queues["text"][len(feats) * b:])
    np.testing.assert_array_equal(np.asarray(state.queues["text"][len(feats) * b:]), untouched)
  norms = np.linalg.norm(np.concatenate(feats), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  # Momentum encoders move slowly: consecutive batches' features differ, but little.
  assert 0 < np.abs(feats[1] - feats[0]).max() < 0.5


def _run(c, batch, devices, num_groups, steps=3):
  from nas_jax import sharding
  _, _, _, state, step = build(c, num_groups=num_groups)
  mesh = sharding.make_mesh(c.mesh, devices)
  state_sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sh)
    f = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                out_shardings=(state_sh, None))
    out = []
    for _ in range(steps):
      state, m = f(state, sharding.host_to_global(batch, mesh))
      out.append(jax.device_get(m))
  return jax.device_get(state), out


def test_eight_devices_match_one_device(stage2):
  """Same global batch on 1 and on 8 simulated devices: the same losses, VD update and queues.
  Hard negatives are drawn per device-local slice; the 1-device run uses the same 8 slices."""
  c, batch = stage2
  devices = jax.devices()
  assert len(devices) >= 8, "conftest sets 8 simulated CPU devices"
  s1, m1 = _run(c, batch, devices[:1], num_groups=8)
  s8, m8 = _run(c, batch, devices[:8], num_groups=8)
  for a, b in zip(m1, m8):
    for k in ("loss_itc", "loss_mlm", "loss_itm", "loss", "itm_acc"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  np.testing.assert_allclose(s1.batch_stats["dictionary"]["codebook"],
                             s8.batch_stats["dictionary"]["codebook"], rtol=1e-4, atol=1e-5)
  for k in ("image", "text"):
    np.testing.assert_allclose(s1.queues[k], s8.queues[k], rtol=1e-4, atol=1e-5)
  assert int(s1.queues["ptr"]) == int(s8.queues["ptr"])


def test_nonfinite_skip_keeps_state(stage2):
  c, batch = stage2
  c2 = tiny_config(**{"nonfinite": "skip", "nva.enabled": True, "itm.text_negatives": True})
  _, _, _, state, step = build(c2)
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  new, m = jax.jit(step)(state, bad)
  assert not bool(m["finite"])
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(state.queues["image"]), np.asarray(new.queues["image"]))


def test_nva_requires_dictionary():
  from nas_jax.train_step import make_train_step
  c = tiny_config(**{"nva.enabled": True, "model.use_dictionary": False})
  with pytest.raises(ValueError, match="use_dictionary"):
    make_train_step(c, None, optax.sgd(1.0), lambda s: 1.0, token_ids=None, num_groups=1,
                    alpha_warmup_steps=1)
