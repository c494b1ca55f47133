"""Ensembles as stacked parameter trees: every leaf gets a leading member axis of size K.

A full ensemble of K reward models is one tree whose leaves are `[K, ...]`; applying it
is `jax.vmap(apply_one)(stacked_params, ...)`, one compiled program for all members.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks K trees of the same structure and shapes into one tree with leaves `[K, ...]`."""
  if not trees:
    raise ValueError('ensemble.stack: got no trees; pass a non-empty list of parameter trees.')
  structure = jax.tree.structure(trees[0])
  for i, tree in enumerate(trees[1:], start=1):
    if jax.tree.structure(tree) != structure:
      raise ValueError(f'ensemble.stack: tree {i} has structure {jax.tree.structure(tree)}, '
                       f'tree 0 has {structure}; all members must share one layout.')
    for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(tree)):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f'ensemble.stack: tree {i} has a leaf of shape {jnp.shape(b)} where tree 0 has '
                         f'{jnp.shape(a)}; members must have the same config.')
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def num_members(tree: PyTree) -> int:
  """K, the common leading dimension of every leaf."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'ensemble.num_members: leaves have leading dimensions {sorted(map(str, sizes))}; '
                     'a stacked tree has one common leading member axis.')
  return sizes.pop()


def member(tree: PyTree, i: int) -> PyTree:
  """Member `i` of a stacked tree (leaves `[K, ...]` -> `[...]`)."""
  k = num_members(tree)
  if not -k <= i < k:
    raise ValueError(f'ensemble.member: index {i} out of range for {k} members.')
  return jax.tree.map(lambda x: x[i], tree)


def unstack(tree: PyTree) -> list[PyTree]:
  """The K member trees of a stacked tree, in order (inverse of `stack`)."""
  return [member(tree, i) for i in range(num_members(tree))]
