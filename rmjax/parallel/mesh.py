"""Device meshes and shardings for parameters, optimizer state and batches.

The mesh has named axes `data` and `fsdp` (either of size 1). Batches are split over both
axes (`('data', 'fsdp')` on the leading batch dimension); parameters are sharded over
`fsdp` by logical-axis rules: each parameter dimension carries a logical name
(`rmjax.models.partitioning.logical_axes`), and `RULES` maps names to mesh axes. A
dimension whose size the mesh axis does not divide stays replicated, so every model
shards on every mesh.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')

# logical axis name -> mesh axis (None: replicated).
RULES: Mapping[str, str | None] = {
    'embed': 'fsdp',
    'vocab': None,
    'qkv': None,
    'heads': None,
    'mlp': None,
    'norm': None,
    'ensemble': None,
    'reward_heads': None,
    'positions': None,
}


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp')` mesh over `devices` (default: all); `-1` takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp == -1 and data == -1:
    raise ValueError('mesh: at most one of data, fsdp may be -1.')
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != n:
    raise ValueError(f'mesh: data={data} x fsdp={fsdp} does not use the {n} available devices exactly; '
                     f'choose sizes whose product is {n} (or -1 for one of them).')
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
  """`config.mesh` with fields `data` and `fsdp`."""
  return make_mesh(int(mesh_config.data), int(mesh_config.fsdp))


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh,
             rules: Mapping[str, str | None] = RULES) -> P:
  """PartitionSpec for one array from its logical axis names; undivisible dims replicate."""
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not match an array of shape {tuple(shape)}.')
  used, spec = set(), []
  for size, name in zip(shape, names):
    axis = rules.get(name) if name is not None else None
    if axis is not None and (axis in used or size % mesh.shape[axis]):
      axis = None
    if axis is not None:
      used.add(axis)
    spec.append(axis)
  return P(*spec)


def tree_shardings(tree, axes_tree, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
  """NamedShardings for a pytree of arrays given the matching pytree of logical-axis tuples."""
  return jax.tree.map(lambda x, names: NamedSharding(mesh, spec_for(np.shape(x), names, mesh, rules)),
                      tree, axes_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over `('data', 'fsdp')`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
