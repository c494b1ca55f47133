"""Logical axis names for every model parameter, derived from the parameter paths.

`logical_axes(params)` returns a tree of the same structure whose leaves are tuples of
names, one per array dimension (map over it with
`jax.tree.map(f, axes, is_leaf=lambda x: isinstance(x, tuple))`; a scalar's tuple is
empty). A leaf under a `layers` key (the scanned layout of `ModelConfig.scan_layers`) has a
leading layer axis, named 'layers'. A leaf with one more dimension than that is a stacked ensemble
member axis, named 'ensemble' (`rmjax.models.ensemble`), first. The names:

  vocab         token table rows / LM head columns
  positions     learned position table rows (gpt2)
  embed         the residual width D
  qkv           the fused [q | k | v] head dimension (H + 2 KV) hd
  heads         the attention out-projection input H hd
  mlp           the MLP hidden width (F, or 2F for the fused gate_up)
  norm          norm scales and biases
  reward_heads  the K outputs of a reward head
  ensemble      the stacked members of a full ensemble
  layers        the stacked blocks of a scanned backbone (replicated: each device holds its share
                of every layer, and the scan walks the layers)
"""
from __future__ import annotations

from typing import Any

import jax

# (module name, parameter name) -> names of the dimensions of one unstacked member.
_RULES: dict[tuple[str, str], tuple[str, ...]] = {
    ('embed', 'embedding'): ('vocab', 'embed'),
    ('pos_embed', 'embedding'): ('positions', 'embed'),
    ('qkv', 'kernel'): ('embed', 'qkv'),
    ('qkv', 'bias'): ('qkv',),
    ('out', 'kernel'): ('heads', 'embed'),
    ('out', 'bias'): ('embed',),
    ('gate_up', 'kernel'): ('embed', 'mlp'),
    ('gate_up', 'bias'): ('mlp',),
    ('fc', 'kernel'): ('embed', 'mlp'),
    ('fc', 'bias'): ('mlp',),
    ('down', 'kernel'): ('mlp', 'embed'),
    ('down', 'bias'): ('embed',),
    ('lm_head', 'kernel'): ('embed', 'vocab'),
    ('reward_head', 'kernel'): ('embed', 'reward_heads'),
    ('reward_head', 'bias'): ('reward_heads',),
    ('value_head', 'kernel'): ('embed',),
    ('value_head', 'bias'): (),
}
_NORMS = ('attn_norm', 'mlp_norm', 'final_norm')


def _names(path: tuple[str, ...], ndim: int) -> tuple[str, ...]:
  if len(path) >= 2 and path[-2] in _NORMS and path[-1] in ('scale', 'bias'):
    base = ('norm',)
  elif len(path) >= 2 and path[-2:] in _RULES:
    base = _RULES[path[-2:]]
  else:
    raise ValueError(f'logical_axes: no rule for parameter {"/".join(path)}; known (module, param) pairs are '
                     f'{sorted(_RULES)} and norms {_NORMS}.')
  if 'layers' in path:
    base = ('layers',) + base
  if ndim == len(base):
    return base
  if ndim == len(base) + 1:
    return ('ensemble',) + base
  raise ValueError(f'logical_axes: parameter {"/".join(path)} has {ndim} dimensions; expected {len(base)} '
                   f'{base} or {len(base) + 1} with a leading ensemble axis.')


def logical_axes(params: Any) -> Any:
  """A tree like `params` with a tuple of logical axis names per leaf (see module docstring)."""
  def leaf(path, x):
    keys = tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    return _names(keys, len(x.shape))
  return jax.tree_util.tree_map_with_path(leaf, params)
