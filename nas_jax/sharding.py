"""Device mesh, partition rules, host-local → global arrays, multi-process start.

The mesh has axes ('data', 'fsdp') with Auto axis types (the default Explicit type rejects the
codebook gather `embed[idx]`, its scatter-add and the batch-sharded similarity matmuls with a
ShardingTypeError). The batch is split over
both axes; parameters and optimiser state are replicated, or split over 'fsdp' by `param_spec`
(large matrices along their largest divisible dimension, everything small replicated). A stacked
layer array [L, ...] (models/layer_stack.py) is split as each of its layers would be: never along
the layer axis, which the scan slices one layer at a time.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nas_jax.models import layer_stack

BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements than this stay replicated under FSDP (biases, norms, small heads).
FSDP_MIN_SIZE = 2 ** 16


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes (SLURM, TPU pod,
  Open MPI or explicit JAX_COORDINATOR_ADDRESS); a no-op for a single process."""
  import os
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ or "JAX_NUM_PROCESSES" in os.environ
  try:
    if explicit:
      jax.distributed.initialize(
          coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
          num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
          process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    else:
      jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    if explicit:
      raise
    logging.debug("single-process run (jax.distributed.initialize: %s)", e)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp') from `config.mesh` (data=-1: all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = int(mesh_config.fsdp)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the number of devices ({n})")
  data = n // fsdp if mesh_config.data in (-1, None) else int(mesh_config.data)
  if data * fsdp != n:
    raise ValueError(f"config.mesh.data={mesh_config.data} × config.mesh.fsdp={fsdp} != {n} devices; "
                     f"use data=-1 to take all of them")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.data.batch_size") -> None:
  shards = num_batch_shards(mesh)
  if global_batch % shards:
    raise ValueError(
        f"{what}={global_batch} is not divisible by the {shards} data-parallel devices of the mesh "
        f"{dict(mesh.shape)}: use a multiple of {shards}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int, stacked: bool = False) -> P:
  """FSDP rule: split the largest dimension divisible by `fsdp` of a large array. `stacked`: the
  leading axis is a layer axis, never split; size and dimensions are those of one layer."""
  shape = tuple(shape)
  lead = 1 if stacked and shape else 0
  layer = shape[lead:]
  if fsdp <= 1 or int(np.prod(layer, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(layer)), key=lambda d: -layer[d]):
    if layer[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[lead + dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of the train state: params-like leaves by `param_spec`, the rest
  (step, queues, rng, scalars) replicated."""
  fsdp = mesh.shape["fsdp"]

  def leaf(path, x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, param_spec(shape, fsdp, layer_stack.is_stacked(path)))

  shardings = jax.tree_util.tree_map_with_path(leaf, abstract_state)
  # The queues are read whole by every ITC similarity: keep them replicated.
  if hasattr(abstract_state, "queues"):
    shardings = shardings.replace(queues=jax.tree.map(lambda _: replicated(mesh),
                                                      abstract_state.queues))
  return shardings


def host_to_global(batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the batch (numpy) → global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def describe(mesh: Mesh) -> str:
  return (f"process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices "
          f"({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
