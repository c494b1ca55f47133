"""Device meshes and shardings for parameters, optimizer state, batches and KV caches.

The mesh has named axes `data`, `fsdp` and `tensor` (any of size 1). Arrays are placed by
logical-axis rules: each array dimension carries a logical name and `RULES` maps names to
mesh axes (one axis, a tuple of axes, or None = replicated):

  batch                      -> ('data', 'fsdp')   rows of a batch, of a KV cache, of samples
  embed                      -> 'fsdp'             parameters split over fsdp (ZeRO-3 style)
  qkv, heads, mlp, vocab     -> 'tensor'           Megatron-style tensor parallelism: attention
  kv_heads                   -> 'tensor'           heads, the MLP hidden width, the vocabulary
  norm, positions, reward_heads, ensemble, population, cache_len, head_dim,
  layers (the stacked blocks of a scanned backbone) -> replicated

Parameter names come from `rmjax.models.partitioning.logical_axes`; batches use `('batch',
None, ...)`; a KV cache `k [B, KV, hd, S]`, `v [B, KV, S, hd]`, `valid [B, S]` uses `KV_CACHE_AXES`.
A dimension whose size the mesh axes do not divide, or whose axis another dimension of the same array
already uses, stays replicated, so every model shards on every mesh. A `population` or
`ensemble` axis stays replicated: its members run together on every device.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

MeshAxes = str | tuple[str, ...] | None

# logical axis name -> mesh axis or axes (None: replicated).
RULES: Mapping[str, MeshAxes] = {
    'batch': BATCH_AXES,
    'embed': 'fsdp',
    'vocab': 'tensor',
    'qkv': 'tensor',
    'heads': 'tensor',
    'mlp': 'tensor',
    'kv_heads': 'tensor',
    'norm': None,
    'positions': None,
    'reward_heads': None,
    'ensemble': None,
    'population': None,
    'cache_len': None,
    'head_dim': None,
    'layers': None,
}

# KVCache fields (`rmjax.models.transformer.KVCache`) -> logical names of their dimensions.
KV_CACHE_AXES: Mapping[str, tuple[str, ...]] = {
    'k': ('batch', 'kv_heads', 'head_dim', 'cache_len'),
    'v': ('batch', 'kv_heads', 'cache_len', 'head_dim'),
    'valid': ('batch', 'cache_len'),
    'index': (),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all); one size may be `-1` (what is left).

  Devices are laid out in order (process by process), `tensor` fastest, so tensor-parallel
  groups sit on neighbouring devices of one host.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {'data': int(data), 'fsdp': int(fsdp), 'tensor': int(tensor)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f'mesh: at most one of data, fsdp, tensor may be -1, got {sizes}.')
  if free:
    fixed = math.prod(v for k, v in sizes.items() if k != free[0])
    sizes[free[0]] = n // fixed if fixed > 0 and n % fixed == 0 else 0
  if any(v <= 0 for v in sizes.values()) or math.prod(sizes.values()) != n:
    raise ValueError(f'mesh: data={sizes["data"]} x fsdp={sizes["fsdp"]} x tensor={sizes["tensor"]} does not use '
                     f'the {n} available devices exactly; choose sizes whose product is {n} (or -1 for one).')
  return Mesh(np.asarray(devices).reshape(sizes['data'], sizes['fsdp'], sizes['tensor']), MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
  """`config.mesh` with fields `data`, `fsdp` and (optional, default 1) `tensor`."""
  tensor = mesh_config.get('tensor', 1) if hasattr(mesh_config, 'get') else getattr(mesh_config, 'tensor', 1)
  return make_mesh(int(mesh_config.data), int(mesh_config.fsdp), int(tensor))


def _axes(value: MeshAxes) -> tuple[str, ...]:
  return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh,
             rules: Mapping[str, MeshAxes] = RULES) -> P:
  """PartitionSpec for one array from its logical axis names.

  A dimension keeps the longest prefix of its rule's mesh axes that divides its size and that
  no earlier dimension uses (axes of size 1 are left out of the spec). An unknown name raises.
  """
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not match an array of shape {tuple(shape)}.')
  used, spec = set(), []
  for size, name in zip(shape, names):
    if name is not None and name not in rules:
      raise ValueError(f'no sharding rule for the logical axis {name!r}; known: {sorted(rules)}.')
    axes = [a for a in _axes(rules[name] if name is not None else None) if a in mesh.shape]
    kept: list[str] = []
    for a in axes:
      if a in used or size % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]):
        break
      kept.append(a)
    kept = [a for a in kept if mesh.shape[a] > 1]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def tree_shardings(tree, axes_tree, mesh: Mesh, rules: Mapping[str, MeshAxes] = RULES):
  """NamedShardings for a pytree of arrays given the matching pytree of logical-axis tuples."""
  return jax.tree.map(lambda x, names: NamedSharding(mesh, spec_for(np.shape(x), names, mesh, rules)),
                      tree, axes_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over `('data', 'fsdp')`, the rest replicated (also over `tensor`)."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def kv_cache_shardings(cache: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] = RULES):
  """Shardings of a KV cache (`KVCache(k, v, valid, index)`, arrays or ShapeDtypeStructs): rows over
  the batch axes, KV heads over `tensor` (`KV_CACHE_AXES`)."""
  def one(field, x):
    return NamedSharding(mesh, spec_for(np.shape(x), KV_CACHE_AXES[field], mesh, rules))
  return type(cache)(k=tuple(one('k', x) for x in cache.k), v=tuple(one('v', x) for x in cache.v),
                     valid=one('valid', cache.valid), index=one('index', cache.index))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
