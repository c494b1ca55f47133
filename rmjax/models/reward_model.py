"""Reward models: a transformer backbone + scalar head(s), one interface returning `[K, B]`.

Kinds (`RewardModel.kind`):
  'full':       K independent members, each a backbone + a one-output head, initialised
                from its own key; the parameter tree is one member's tree with every leaf
                stacked on a leading axis of size K (`rmjax.models.ensemble`), applied member
                by member inside the one program (a Python loop over the K slices: each
                member's dots and attention keep their single-model shapes; `jax.vmap` adds the
                member axis to every attention fusion, which XLA's CPU backend runs far slower —
                the K = 4 `tiny` and `small` training steps take 20-25% less time unrolled,
                docs/benchmarks.md). Leaves: `backbone/...` `[K, ...]`,
                `reward_head/kernel [K, D, 1]`, `reward_head/bias [K, 1]`.
  'multi_head': one backbone, K heads: `backbone/...`, `reward_head/kernel [D, K]`,
                `reward_head/bias [K]`.

The backbone layout is the LM's (`rmjax.models.transformer`), so a backbone can be
initialised from a language model's `params['backbone']`. The score of a row is the head
applied to the final hidden state at the row's **last real token** (the last index where
`mask` is True), which is right for right-padded rows and for left-padded prompt +
right-padded response rows alike. Positions are `max(cumsum(mask) - 1, 0)`, so a row's
score does not depend on how much padding surrounds it, on which side, or on the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmjax.models.config import ModelConfig
from rmjax.models.heads import RewardHead
from rmjax.models.transformer import Params, Transformer, check_inputs

KINDS = ('full', 'multi_head')


def last_index(mask: jax.Array) -> jax.Array:
  """Index of the last True in each row of `mask [B, T]` -> `[B]` int32 (T - 1 for an empty row)."""
  t = mask.shape[-1]
  return (t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)).astype(jnp.int32)


class ScalarRewardModel(nn.Module):
  """Backbone + `RewardHead(num_heads)`: scores `[B, num_heads]` at the last real token."""
  config: ModelConfig
  num_heads: int = 1

  @nn.compact
  def __call__(self, tokens, mask, positions):
    h, _ = Transformer(self.config, name='backbone')(tokens, mask, positions)
    last = jnp.take_along_axis(h, last_index(mask)[:, None, None], axis=1)[:, 0]
    scores = RewardHead(self.config, self.num_heads, name='reward_head')(last)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), scores, 0.0)


@dataclasses.dataclass(frozen=True)
class RewardModel:
  """A reward model with static config; `init` and `apply` are pure.

  config: the backbone's shapes. num_members: K, the number of scores per row.
  kind: 'full' (K backbones, stacked) or 'multi_head' (one backbone, K heads).
  `apply(params, tokens [B, T], mask [B, T]) -> scores [K, B]` float32 (0 for a row with
  no real token); with K = 1 the output is still `[1, B]`.
  """
  config: ModelConfig
  num_members: int = 1
  kind: str = 'full'

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'RewardModel.kind={self.kind!r}: expected one of {KINDS}.')
    if not isinstance(self.num_members, int) or self.num_members < 1:
      raise ValueError(f'RewardModel.num_members={self.num_members!r}: must be a positive integer.')
    if not isinstance(self.config, ModelConfig):
      raise ValueError(f'RewardModel.config must be a ModelConfig; got {type(self.config).__name__}.')

  def _module(self) -> ScalarRewardModel:
    return ScalarRewardModel(self.config, 1 if self.kind == 'full' else self.num_members)

  def init(self, rng: jax.Array) -> Params:
    """Parameters; for 'full', member i is initialised from `jax.random.split(rng, K)[i]`."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    init_one = lambda key: self._module().init(key, dummy, jnp.ones((1, 1), bool), dummy)['params']
    if self.kind == 'full':
      return jax.vmap(init_one)(jax.random.split(rng, self.num_members))
    return init_one(rng)

  def apply(self, params: Params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Scores `[K, B]` float32 read at the last real token of each row."""
    tokens, mask, positions = check_inputs(self.config, tokens, mask, None)
    apply_one = lambda p: self._module().apply({'params': p}, tokens, mask, positions)
    if self.kind == 'full':
      return jnp.stack([apply_one(jax.tree.map(lambda x: x[k], params))[:, 0] for k in range(self.num_members)])
    return apply_one(params).T

  def to_dict(self) -> dict[str, Any]:
    return {'config': self.config.to_dict(), 'num_members': self.num_members, 'kind': self.kind}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'RewardModel':
    expected = {'config', 'num_members', 'kind'}
    if set(d) != expected:
      raise ValueError(f'RewardModel.from_dict: expected keys {sorted(expected)}; got {sorted(d)}.')
    return cls(ModelConfig.from_dict(d['config']), d['num_members'], d['kind'])
