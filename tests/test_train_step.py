"""The whole NAS step: compiles, learns a fixed batch, momentum EMA, invariance to the device count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from step_utils import build, fixed_batch, tiny_config


@pytest.fixture(scope="module")
def stage2():
  """Tiny stage-2 config (VD + NVA + text negatives: every FGITM pair group is on; the MLM heads
  on the masked positions only, as the stage configs)."""
  c = tiny_config(**{"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 1e-3,
                     "optim.warmup_steps": 1, "total_steps": 40, "mlm.max_masked": -1})
  return c, fixed_batch(c)


def test_overfits_one_batch_momentum_queue_and_skip(stage2):
  """30 steps on one batch: every loss term moves; the momentum encoders follow the EMA rule; the
  queue holds the momentum features in order and wraps; a non-finite batch is skipped."""
  _, batch = stage2
  # From-scratch BERT/ViT features start nearly identical across samples, so ITC needs many steps to
  # separate them; a constant, larger learning rate and a fast momentum make 30 steps enough to see
  # the loss terms move. The queue holds two batches.
  c = tiny_config(**{"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 2e-3,
                     "optim.warmup_steps": 1, "total_steps": 1000, "itc.queue_size": 64,
                     "itc.momentum": 0.5, "itc.alpha": 0.0, "nonfinite": "skip",
                     "model.vit.init_std": 0.02, "model.bert.initializer_range": 0.02})
  _, _, _, state, step = build(c)
  step = jax.jit(step)
  b = c.data.batch_size
  losses = []
  for i in range(30):
    before = state
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    if i == 0:
      first = jax.device_get(m)
    if i < 3:
      # Step i writes the batch's ids and momentum features at rows (i mod 2)·b, then wraps.
      rows = slice((i % 2) * b, (i % 2 + 1) * b)
      other = slice(((i + 1) % 2) * b, ((i + 1) % 2 + 1) * b)
      assert int(state.queues["ptr"]) == ((i + 1) * b) % c.itc.queue_size
      np.testing.assert_array_equal(np.asarray(state.queues["idx"][rows]), batch["image_id"])
      np.testing.assert_array_equal(np.asarray(state.queues["text"][other]),
                                    np.asarray(before.queues["text"][other]))
      np.testing.assert_allclose(np.linalg.norm(np.asarray(state.queues["image"][rows]), axis=-1),
                                 1.0, rtol=1e-5)
      assert np.abs(np.asarray(state.queues["image"][rows]) -
                    np.asarray(before.queues["image"][rows])).max() > 0
    if i == 3:
      # Momentum encoders: params_m ← m·params_m + (1−m)·params, with the online params of the
      # previous step (ALBEF updates before the forward).
      mom = c.itc.momentum
      want = jax.tree.map(lambda pm, p: mom * pm + (1 - mom) * p, before.params_m,
                          {k: before.params[k] for k in before.params_m})
      got = state.params_m
      for a, bb in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(bb), rtol=1e-6, atol=1e-7)
      moved = max(float(jnp.max(jnp.abs(a - bb)))
                  for a, bb in zip(jax.tree.leaves(before.params_m), jax.tree.leaves(got)))
      assert moved > 0
  assert all(np.isfinite(losses))
  assert min(losses[-5:]) < 0.85 * losses[0], losses
  assert float(m["loss_mlm"]) < 0.8 * first["loss_mlm"]
  assert float(m["loss_itm"]) < 0.5 * first["loss_itm"]  # Learns at least the 1:4 label prior.
  assert set(m) >= {"loss_itc", "loss_mlm", "loss_itm", "itm_acc", "alpha", "temp", "lr",
                    "vd_perplexity", "vd_used_codes", "nva_replaced_frac", "grad_norm"}
  assert 0 < float(m["nva_replaced_frac"]) <= 1
  assert int(state.step) == 30
  assert c.itc.temp_min <= float(m["temp"]) <= c.itc.temp_max

  # A non-finite batch with nonfinite='skip': the step counter moves, nothing else does.
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  new, m = step(state, bad)
  assert not bool(m["finite"])
  assert int(new.step) == 31
  for a, bb in zip(jax.tree.leaves((state.params, state.params_m, state.batch_stats, state.queues)),
                   jax.tree.leaves((new.params, new.params_m, new.batch_stats, new.queues))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(bb))


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


def test_nva_requires_dictionary():
  from nas_jax.train_step import make_train_step
  c = tiny_config(**{"nva.enabled": True, "model.use_dictionary": False})
  with pytest.raises(ValueError, match="use_dictionary"):
    make_train_step(c, None, optax.sgd(1.0), lambda s: 1.0, token_ids=None, num_groups=1,
                    alpha_warmup_steps=1)


def test_mlm_head_on_masked_positions_is_the_same_step(stage2):
  """`mlm.max_masked=-1` caps the masked tokens at 12 per text of 24 (a cap the tiny texts, with
  at most 15 maskable tokens at 15 %, do not reach in this batch), so it masks as ALBEF does;
  the online and momentum MLM heads then run on the 12 gathered positions only, and the step
  (metrics, parameters) is the one of the heads over all 24 positions. (The accumulated step:
  test_scale_accum.py.)"""
  from nas_jax import objectives
  from step_utils import assert_params_close
  c, batch = stage2
  assert objectives.resolve_max_masked(-1, c.data.max_text_len, c.mlm.prob) == 12
  runs = []
  for max_masked in (0, -1):
    cfg = tiny_config(**{"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 1e-3,
                         "optim.warmup_steps": 1, "total_steps": 40, "mlm.max_masked": max_masked})
    _, _, _, state, step = build(cfg)
    runs.append(jax.device_get(jax.jit(step)(state, batch)))
  (s_full, m_full), (s_cap, m_cap) = runs
  assert float(m_full["loss_mlm"]) > 0
  for k in ("loss", "loss_mlm", "loss_itc", "loss_itm", "grad_norm"):
    np.testing.assert_allclose(m_cap[k], m_full[k], rtol=1e-5, err_msg=k)
  assert_params_close(s_cap.params, s_full.params, atol=1e-6)
