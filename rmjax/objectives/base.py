"""Shared types: member statistics, the reward context, stateful transforms and their state."""
from typing import Any, Callable, NamedTuple

from jaxtyping import Array, Float, Int

State = Any


class RewardStats(NamedTuple):
  """Per-member normalisation statistics of an ensemble, saved with the reward model.

  Member k's normalised score is (r_k − mean[k]) / std[k]; both are measured on reward-model
  scores of reference samples (`../shared/PITFALLS.md` #10).

  Attributes:
    mean: [K] per-member mean.
    std: [K] per-member standard deviation (> 0).
  """
  mean: Float[Array, 'K']
  std: Float[Array, 'K']


class RewardContext(NamedTuple):
  """What reward transforms may read besides the reward itself; every field is optional.

  Attributes:
    stats: per-member `RewardStats` for aggregations over [K, B] scores.
    ref_reward: [B] a given reference reward r_ref(x) per example (for `combine`: [M, B]).
    ref_samples: [P, N] rewards of N reference-policy samples for each of P prompts
      (for `combine`: [M, P, N]).
    prompt_ids: [B] int32 index into the P prompts of `ref_samples`.
    logp: [B, T] log π(y_t | x, y_<t) of the sampled tokens.
    ref_logp: [B, T] log π_ref(y_t | x, y_<t) of the same tokens.
    mask: [B, T] 1 on response tokens, 0 on padding.
    lengths: [B] response lengths (defaults to the row sums of `mask`).
  """
  stats: RewardStats | None = None
  ref_reward: Float[Array, '...'] | None = None
  ref_samples: Float[Array, '...'] | None = None
  prompt_ids: Int[Array, 'B'] | None = None
  logp: Float[Array, 'B T'] | None = None
  ref_logp: Float[Array, 'B T'] | None = None
  mask: Float[Array, 'B T'] | None = None
  lengths: Float[Array, 'B'] | None = None


class Transform(NamedTuple):
  """A stateful piece in optax's shape: a pair of pure functions.

  Attributes:
    init: `init() -> state`, a NamedTuple with an int32 `count`.
    apply: for reward transforms `apply(reward, state, ctx) -> (reward, state)`; other stateful
      pieces document their own arguments, always returning `(output, new_state)`.
  """
  init: Callable[[], State]
  apply: Callable[..., tuple[Any, State]]


class EmptyState(NamedTuple):
  """State of a stateless piece: nothing."""


def empty_state() -> EmptyState:
  """`init` of stateless pieces."""
  return EmptyState()


def stateless(fn: Callable[[Any, RewardContext], Any]) -> Transform:
  """Wraps `fn(reward, ctx) -> reward` as a `Transform` with empty state."""

  def apply(reward, state, ctx=RewardContext()):
    return fn(reward, ctx), state

  return Transform(empty_state, apply)


def chain(*transforms: Transform) -> Transform:
  """Composes reward `Transform`s left to right; the state is the tuple of their states.

  Raises:
    ValueError: if a piece is not a `Transform`, saying how to make one.
  """
  for i, t in enumerate(transforms):
    if not isinstance(t, Transform):
      raise ValueError(
          f'chain: argument {i} is {type(t).__name__}, not a Transform. Build reward pieces with '
          'rmjax.objectives.transform(name, **options), or wrap a function f(reward, ctx) with '
          'rmjax.objectives.stateless(f).')

  def init():
    return tuple(t.init() for t in transforms)

  def apply(reward, state, ctx=RewardContext()):
    if len(state) != len(transforms):
      raise ValueError(f'chain: state has {len(state)} parts for {len(transforms)} transforms; '
                       'create it with the same chain\'s init().')
    new_state = []
    for t, s in zip(transforms, state):
      reward, s = t.apply(reward, s, ctx)
      new_state.append(s)
    return reward, tuple(new_state)

  return Transform(init, apply)

