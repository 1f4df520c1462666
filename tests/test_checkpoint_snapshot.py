"""`checkpoint.snapshot`: a save copies the state on the device and notes the data position, and a
writer thread hands them to orbax while the loop moves on (donating the state, advancing the
iterator). The checkpoint must hold the step it was asked for, not what the loop did next."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nas_jax import checkpoint


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_snapshot_save_holds_its_step_while_the_loop_moves_on(tmp_path):
  config = ml_collections.ConfigDict({"seed": 0})
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=True, snapshot=True)
  state = {"w": jnp.arange(8.0), "step": jnp.int32(1)}
  it = _iterator()
  assert [next(it), next(it)] == [0, 1]
  assert ckpt.save(1, state, config, it, loop={"skipped_updates": 0})
  # The loop continues at once: the next step donates the state, the iterator moves on.
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  state = bump(state)
  assert next(it) == 2
  ckpt.wait()
  saves = ckpt.poll_saves()
  assert [s["step"] for s in saves] == [1]
  assert 0 <= saves[0]["checkpoint_blocking_s"] <= saves[0]["checkpoint_save_s"]
  assert ckpt.latest_step() == 1
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  it2 = _iterator()
  restored, step = ckpt.restore(abstract, config, it2)
  ckpt.close()
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(restored["w"], np.arange(8.0))
  assert next(it2) == 2   # The position at the save, not the iterator's position now.
  np.testing.assert_array_equal(state["w"], np.arange(8.0) + 1)


def test_snapshot_is_off_for_synchronous_saves(tmp_path):
  """With async_save=False a save returns once the files are written: no writer thread."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False, snapshot=True)
  ckpt.save(3, {"w": jnp.ones(2)}, ml_collections.ConfigDict({"seed": 0}))
  assert ckpt._writer is None and ckpt.latest_step() == 3
  assert (tmp_path / "checkpoints" / "3" / "state").is_dir()
  ckpt.close()
