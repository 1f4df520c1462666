"""Layer stacks (models/layer_stack.py): the scan helper splits rngs per layer; per-layer and
stacked trees convert both ways (params, AdamW states, abstract shapes); weight decay, AdamW and
the FSDP rules treat a stacked array as its layers; the NAS model's two layouts hold the same
parameters and take the same train steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_utils import tiny_config

from nas_jax import optim, sharding
from nas_jax.models import layer_stack


class Probe(nn.Module):
  """A layer that shows its per-layer parameter and dropout mask (as the scan's outputs)."""

  @nn.compact
  def __call__(self, x, deterministic):
    w = self.param("w", nn.initializers.normal(1.0), (4,))
    keep = nn.Dropout(0.5)(jnp.ones(16), deterministic=deterministic)
    return x + jnp.sum(w) * keep[0], keep


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_draw_their_own_params_and_dropout(remat):
  stack = layer_stack.scanned(Probe, 3, remat=remat, static_argnums=(2,))()
  variables = stack.init(jax.random.key(0), jnp.zeros(()), True)
  w = np.asarray(variables["params"]["w"])
  assert w.shape == (3, 4) and len({tuple(r) for r in w}) == 3
  _, masks = stack.apply(variables, jnp.zeros(()), False, rngs={"dropout": jax.random.key(1)})
  masks = np.asarray(masks)
  assert masks.shape == (3, 16) and len({tuple(r) for r in masks}) == 3
  _, again = stack.apply(variables, jnp.zeros(()), False, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(np.asarray(again), masks)
  _, off = stack.apply(variables, jnp.zeros(()), True)
  np.testing.assert_array_equal(np.asarray(off), np.ones((3, 16)))


def _nas_shapes(scan: bool):
  """Abstract NAS params (tiny config: 2 ViT blocks, 1 text + 1 fusion layer) in one layout."""
  from nas_jax.models.nas import NASModel
  c = tiny_config(**{"model.scan_layers": scan})
  res = c.model.vit.image_size
  ids = jnp.zeros((1, 4), jnp.int32)
  return c, jax.eval_shape(NASModel(config=c.model).init, jax.random.key(0),
                           jnp.zeros((1, res, res, 3)), ids, ids)["params"]


def _random(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), tree)


def test_nas_layouts_hold_the_same_parameters_and_convert_both_ways():
  config, stacked = _nas_shapes(True)
  _, per_layer = _nas_shapes(False)
  assert set(stacked["vit"]) - set(per_layer["vit"]) == {"blocks"}
  assert {"text_layers", "fusion_layers"} <= set(stacked["bert"])
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(stacked) == size(per_layer)
  assert len(jax.tree.leaves(stacked)) < len(jax.tree.leaves(per_layer))
  # Abstract shapes convert to each other's init shapes.
  assert layer_stack.stack_layers(per_layer, config) == stacked
  assert layer_stack.unstack_layers(stacked) == per_layer
  # Values: numpy and jax arrays, round trip exact, the config deciding the direction.
  values = _random(per_layer)
  up = layer_stack.to_layout(values, config)
  assert jax.tree.map(np.shape, up) == jax.tree.map(np.shape, stacked)
  np.testing.assert_array_equal(up["bert"]["fusion_layers"]["crossattention"]["key"]["kernel"][0],
                                values["bert"]["layer_1"]["crossattention"]["key"]["kernel"])
  np.testing.assert_array_equal(up["vit"]["blocks"]["mlp"]["fc1"]["bias"][1],
                                values["vit"]["blocks_1"]["mlp"]["fc1"]["bias"])
  with config.unlocked():
    config.model.scan_layers = False
  down = layer_stack.to_layout(jax.tree.map(jnp.asarray, up), config)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(down))
  jax.tree.map(np.testing.assert_array_equal, down, values)
  # Already in the config's layout: unchanged.
  jax.tree.map(np.testing.assert_array_equal, layer_stack.to_layout(values, config), values)
  # Optimizer states (namedtuples in tuples) convert too.
  import optax
  state = optax.adam(1e-3).init(values)
  stacked_state = layer_stack.stack_layers(state, tiny_config())
  assert jax.tree.map(np.shape, stacked_state[0].mu) == jax.tree.map(np.shape, stacked)
  assert type(stacked_state[0]) is type(state[0])


def test_bad_trees_are_errors_naming_what_to_do():
  _, per_layer = _nas_shapes(False)
  config = tiny_config()
  with pytest.raises(ValueError, match="needs the config's model.bert section"):
    layer_stack.stack_layers(per_layer["bert"])
  deeper = tiny_config(**{"model.bert.num_layers": 3})
  with pytest.raises(ValueError, match="2 layer_{i} subtrees does not match "
                                       "model.bert.num_layers=3"):
    layer_stack.stack_layers(per_layer, deeper)
  gap = {k: v for k, v in per_layer["vit"].items() if k != "blocks_0"}
  with pytest.raises(ValueError, match=r"not numbered 0..0"):
    layer_stack.stack_layers(gap)
  # fusion_layer=2 makes both layers text layers, but layer 1 has cross-attention.
  with pytest.raises(ValueError, match="cannot stack bert/text_layers: its layers differ"):
    layer_stack.stack_layers(per_layer["bert"], tiny_config(**{"model.bert.fusion_layer": 2}))
  with pytest.raises(ValueError, match="both 'blocks' and per-layer"):
    layer_stack.stack_layers(dict(per_layer["vit"], blocks={}))
  # The default layout is unrolled; a bare encoder section (no scan_layers key) too.
  assert not layer_stack.scan_enabled(config) and not layer_stack.scan_enabled(config.model.vit)


def test_decay_and_adamw_treat_a_stack_as_its_layers():
  """Weight decay skips stacked biases and norms ([L, D]) as it skips per-layer ones ([D]); one
  AdamW step on the stacked tree is the per-layer step, stacked."""
  config, stacked = _nas_shapes(True)
  _, per_layer = _nas_shapes(False)
  mask_stacked = optim.decay_mask(stacked)
  assert not mask_stacked["vit"]["blocks"]["attn"]["qkv"]["bias"]
  assert mask_stacked["vit"]["blocks"]["attn"]["qkv"]["kernel"]
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  per_layer_masks = {jax.tree_util.keystr(p): m for p, m in flat(optim.decay_mask(per_layer))}
  for path, m in flat(mask_stacked):
    name = jax.tree_util.keystr(path).replace("['blocks']", "['blocks_0']")
    name = name.replace("['text_layers']", "['layer_0']")
    name = name.replace("['fusion_layers']", "['layer_1']")
    assert per_layer_masks[name] == m, name

  tx, _ = optim.make_optimizer(config.optim, 100)
  params, grads = _random(per_layer, 0), _random(per_layer, 1)
  want = _adamw_steps(tx, params, grads)
  got = _adamw_steps(tx, layer_stack.stack_layers(params, config),
                     layer_stack.stack_layers(grads, config))
  got = layer_stack.unstack_layers(got)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), want[0], params)
  assert min(jax.tree.leaves(moved)) > 0


def _adamw_steps(tx, params, grads, steps=2):
  """(params, optimizer state) after `steps` AdamW steps with the same gradients."""
  import optax
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_fsdp_splits_a_stack_as_each_of_its_layers_never_the_layer_axis():
  mesh = sharding.make_mesh(tiny_config(**{"mesh.fsdp": 4}).mesh, jax.devices()[:8])
  _, stacked = _nas_shapes(True)
  _, per_layer = _nas_shapes(False)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sharding, "FSDP_MIN_SIZE", 1024)
    got = sharding.state_shardings(stacked, mesh)
    want = sharding.state_shardings(per_layer, mesh)
    assert sharding.param_spec((4, 8, 4096), 4, stacked=True) == jax.sharding.PartitionSpec(
        None, None, "fsdp")
    # Size per layer decides (512 < 1024), and the layer axis is never split, even where it is
    # the only one divisible.
    assert sharding.param_spec((8, 512), 4, stacked=True) == jax.sharding.PartitionSpec()
    assert sharding.param_spec((8, 512), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.param_spec((8, 4099), 4, stacked=True) == jax.sharding.PartitionSpec()
  split = 0
  for name, layer in (("blocks", "blocks_1"),):
    for (path, s), (_, w) in zip(jax.tree_util.tree_flatten_with_path(got["vit"][name])[0],
                                 jax.tree_util.tree_flatten_with_path(want["vit"][layer])[0]):
      assert tuple(s.spec) in ((), (None,) + tuple(w.spec)), path
      assert len(s.spec) == 0 or s.spec[0] is None
      split += "fsdp" in tuple(s.spec)
  assert split >= 4
  specs = [s.spec for s in jax.tree.leaves(got["bert"]["fusion_layers"])]
  assert any("fsdp" in tuple(s) for s in specs) and all(len(s) == 0 or s[0] is None for s in specs)


@pytest.mark.slow   # Three compilations of the tiny stage-2 step.
def test_the_train_step_is_the_same_in_every_layout():
  """One state, per layer, scanned (nn.scan) or stacked with unrolled layers
  (`model.stacked_layout`): two whole stage-2 steps (momentum EMA, every loss, AdamW with its decay
  mask, grad norm) give the same metrics and parameters (dropout off: nn.scan draws its masks per
  layer differently). The stacked layout holds the scanned layout's arrays and computes the
  unrolled step itself (to 1e-6)."""
  from step_utils import assert_params_close, build, fixed_batch
  over = {"nva.enabled": True, "itm.text_negatives": True, "optim.lr": 1e-3,
          "optim.warmup_steps": 1, "total_steps": 20, "model.bert.hidden_dropout": 0.0,
          "model.bert.attention_dropout": 0.0}
  c_unrolled = tiny_config(**over, **{"model.scan_layers": False})
  c_scanned = tiny_config(**over, **{"model.scan_layers": True})
  c_stacked = tiny_config(**over, **{"model.stacked_layout": True})
  batch = fixed_batch(c_unrolled)
  _, _, _, unrolled, step_unrolled = build(c_unrolled)
  _, _, _, fresh, step_scanned = build(c_scanned, init=False)
  _, _, _, fresh_stacked, step_stacked = build(c_stacked, init=False)
  stack = lambda t: layer_stack.stack_layers(t, c_scanned)
  scanned = unrolled.replace(params=stack(unrolled.params), params_m=stack(unrolled.params_m),
                             opt_state=stack(unrolled.opt_state))
  assert (jax.tree.structure(scanned) == jax.tree.structure(fresh)
          == jax.tree.structure(fresh_stacked))
  assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, fresh)
  assert len(jax.tree.leaves(fresh_stacked)) < len(jax.tree.leaves(unrolled))
  stacked = scanned
  steps = {"unrolled": jax.jit(step_unrolled), "scanned": jax.jit(step_scanned),
           "stacked": jax.jit(step_stacked)}
  # nn.scan's loop body fuses differently from the unrolled layers: float32 rounding, which the
  # second step's gradient norm carries to ~1e-5 (2e-5 at most seen, on one CPU model).
  for _ in range(2):
    unrolled, m_unrolled = steps["unrolled"](unrolled, batch)
    scanned, m_scanned = steps["scanned"](scanned, batch)
    stacked, m_stacked = steps["stacked"](stacked, batch)
    for k in ("loss", "loss_itc", "loss_mlm", "loss_itm", "grad_norm"):
      np.testing.assert_allclose(float(m_scanned[k]), float(m_unrolled[k]), rtol=5e-5, err_msg=k)
      np.testing.assert_allclose(float(m_stacked[k]), float(m_unrolled[k]), rtol=1e-6, err_msg=k)
  for got, atol in ((scanned, 2e-5), (stacked, 1e-6)):
    assert_params_close(layer_stack.unstack_layers(jax.device_get(got.params)),
                        jax.device_get(unrolled.params), atol=atol)
    assert_params_close(layer_stack.unstack_layers(jax.device_get(got.params_m)),
                        jax.device_get(unrolled.params_m), atol=atol)

