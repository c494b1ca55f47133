"""Advantage estimators over per-token rewards.

Every estimator takes token rewards [B, T] (a sequence reward on the last valid token plus any
per-token penalties, e.g. from `kl_penalty`), the response mask [B, T] and, for `gae`, values
[B, T], and returns `Advantage(advantages [B, T], returns [B, T])`, zero on padding. Group
estimators (`rloo`, `grpo`, `dr_grpo`) read the k = `group_size` samples of one prompt as
consecutive rows (B = P·k). `group_size` and boolean options are static; γ, λ, ε and the
baseline decay may be traced. Advantages are targets: apply `jax.lax.stop_gradient` where the
trainer differentiates through rewards.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rmjax.objectives import _checks
from rmjax.objectives.base import Transform
from rmjax.objectives.registry import register


class Advantage(NamedTuple):
  """advantages [B, T] and returns [B, T] (the value targets), both zero on padding."""
  advantages: Float[Array, 'B T']
  returns: Float[Array, 'B T']


def _inputs(rewards: Array, mask: Array, piece: str) -> tuple[Array, Array]:
  _checks.expect_rank(rewards, 2, '[B, T] (token rewards)', 'rewards', piece)
  _checks.expect(mask, rewards.shape, '[B, T] like rewards', 'mask', piece)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.where(mask > 0, rewards, 0.0), mask


def returns_to_go(rewards: Float[Array, 'B T'], mask: Float[Array, 'B T']) -> Float[Array, 'B T']:
  """G_t = Σ_{i≥t} m_i·r_i (undiscounted), zero on padding."""
  rewards, mask = _inputs(rewards, mask, 'returns_to_go')
  return jnp.cumsum(rewards[:, ::-1], axis=-1)[:, ::-1] * mask


def _gae_one(r_t: Array, v_t: Array, m_t: Array, gamma: Any, lam: Any) -> Array:
  """GAE over one sequence [T] by a reverse scan; the episode ends after the last valid token."""
  v_tp1 = jnp.concatenate([v_t[1:] * m_t[1:], jnp.zeros((1,), v_t.dtype)])
  m_tp1 = jnp.concatenate([m_t[1:], jnp.zeros((1,), m_t.dtype)])
  delta_t = r_t + gamma * v_tp1 - v_t

  def step(a_tp1, xs):
    delta, m_next = xs
    a = delta + gamma * lam * m_next * a_tp1
    return a, a

  _, a_t = jax.lax.scan(step, jnp.zeros((), r_t.dtype), (delta_t, m_tp1), reverse=True)
  return a_t * m_t


@register('gae', kind='advantage')
def gae(gamma: Any = 1.0, lam: Any = 0.95) -> Callable:
  """Generalized advantage estimation (Schulman et al., 2016).

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = Σ_{l≥0} (γλ)^l·δ_{t+l},   returns R_t = A_t + V_t

  with V = 0 after the last valid token (a finished response). γ = λ = 1 gives the
  returns-to-go minus the values; λ = 0 the one-step TD error. γ, λ may be traced.

  Returns:
    `fn(rewards [B, T], mask [B, T], values [B, T]) -> Advantage`.
  """

  def fn(rewards: Float[Array, 'B T'], mask: Float[Array, 'B T'],
         values: Float[Array, 'B T'] | None = None) -> Advantage:
    rewards, mask = _inputs(rewards, mask, 'gae')
    values = _checks.require(values, 'values [B, T]', 'gae', '(GAE bootstraps from a value head)')
    _checks.expect(values, rewards.shape, '[B, T] like rewards', 'values', 'gae')
    values = jnp.where(mask > 0, values, 0.0)
    adv = jax.vmap(_gae_one, in_axes=(0, 0, 0, None, None))(rewards, values, mask, gamma, lam)
    return Advantage(adv, (adv + values) * mask)

  return fn


def _groups(seq: Array, group_size: int, piece: str) -> Array:
  """[B] -> [P, k], checking that B is a multiple of k."""
  b = seq.shape[0]
  if b % group_size:
    raise ValueError(f'{piece}: batch size {b} is not a multiple of group_size {group_size}; '
                     'put the k samples of each prompt in consecutive rows.')
  return seq.reshape(b // group_size, group_size)


def _check_group_size(group_size: Any, minimum: int, piece: str) -> None:
  if not isinstance(group_size, int) or group_size < minimum:
    raise ValueError(f'{piece}: group_size must be a static int >= {minimum}, got {group_size!r}.')


def _sequence_advantage(piece: str, group_size: int, seq_fn: Callable[[Array], Array]) -> Callable:
  """Builds a group estimator from seq_fn: grouped sequence returns [P, k] -> advantages [P, k]."""

  def fn(rewards: Float[Array, 'B T'], mask: Float[Array, 'B T'],
         values: Float[Array, 'B T'] | None = None) -> Advantage:
    del values
    rewards, mask = _inputs(rewards, mask, piece)
    seq = rewards.sum(-1)
    adv = seq_fn(_groups(seq, group_size, piece)).reshape(seq.shape)
    return Advantage(adv[:, None] * mask, returns_to_go(rewards, mask))

  return fn


@register('rloo', kind='advantage')
def rloo(group_size: int) -> Callable:
  """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics").

  With R_i = Σ_t r_it the return of sample i among the k samples of its prompt,

    A_i = R_i − (1/(k−1))·Σ_{j≠i} R_j,

  the same for every token of the response. The baseline of a sample excludes that sample.
  Order of the KL penalty (`../shared/PITFALLS.md` #9): it enters *before* the baseline — the
  token rewards passed in already hold −β·log-ratio (from `kl_penalty`), so R_i is the
  KL-penalised return and the baseline averages the other samples' penalised returns, as in
  Ahmadian et al. `group_size` = k ≥ 2, static.

  Returns:
    `fn(rewards [B, T], mask [B, T], values=None) -> Advantage`.
  """
  _check_group_size(group_size, 2, 'rloo')

  def seq_fn(r):
    baseline = (r.sum(-1, keepdims=True) - r) / (group_size - 1)
    return r - baseline

  return _sequence_advantage('rloo', group_size, seq_fn)


@register('grpo', kind='advantage')
def grpo(group_size: int, eps: Any = 1e-4, unbiased: bool = False) -> Callable:
  """Group-normalised advantages of GRPO (Shao et al., 2024, DeepSeekMath).

    A_i = (R_i − mean_j R_j) / (std_j R_j + ε)

  over the k samples of a prompt; std is the population one (1/k) unless `unbiased`
  (1/(k−1), static); ε = 1e-4 by default (may be traced). The variance is computed in two
  passes and its square root with a zero-safe gradient, so a zero-variance group gives A = 0
  with finite gradients, and |A_i| ≤ sqrt(k−1) (population std) for any group.

  Returns:
    `fn(rewards [B, T], mask [B, T], values=None) -> Advantage`.
  """
  _check_group_size(group_size, 2 if unbiased else 1, 'grpo')

  def seq_fn(r):
    dev = r - r.mean(-1, keepdims=True)
    var = jnp.square(dev).sum(-1, keepdims=True) / (group_size - 1 if unbiased else group_size)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    return dev / (std + eps)

  return _sequence_advantage('grpo', group_size, seq_fn)


@register('dr_grpo', kind='advantage')
def dr_grpo(group_size: int) -> Callable:
  """Dr. GRPO advantages (Liu et al., 2025, "Understanding R1-Zero-Like Training"): A_i = R_i − mean_j R_j.

  No division by the group std (which up-weights near-constant groups) — pair it with the
  `constant` reduction, which removes GRPO's per-response length normalisation as well.
  `group_size` static.

  Returns:
    `fn(rewards [B, T], mask [B, T], values=None) -> Advantage`.
  """
  _check_group_size(group_size, 1, 'dr_grpo')
  return _sequence_advantage('dr_grpo', group_size, lambda r: r - r.mean(-1, keepdims=True))


class ReinforceState(NamedTuple):
  """`count` updates and the moving-average baseline b."""
  count: Int[Array, '']
  baseline: Float[Array, '']


@register('reinforce', kind='advantage')
def reinforce(decay: Any = None) -> Transform:
  """REINFORCE (Williams, 1992) with an optional moving-average baseline: A_t = G_t − b.

  G_t = Σ_{i≥t} r_i is the return-to-go. With `decay` = None there is no baseline (b = 0);
  with a decay d in [0, 1) (may be traced) b is an exponential moving average of past batches'
  mean sequence returns, b ← d·b + (1−d)·mean_b R_b (b ← mean R on the first batch). The
  baseline used for a batch is computed from earlier batches only, so it does not bias the
  gradient.

  Returns:
    `Transform`: `init() -> ReinforceState`; `apply(rewards [B, T], mask [B, T], state) -> (Advantage, state)`.
  """
  if decay is not None:
    _checks.nonnegative(decay, 'decay', 'reinforce')
    _checks.positive(1.0 - decay, '1 - decay', 'reinforce')

  def init() -> ReinforceState:
    return ReinforceState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

  def apply(rewards: Float[Array, 'B T'], mask: Float[Array, 'B T'], state: ReinforceState
            ) -> tuple[Advantage, ReinforceState]:
    rewards, mask = _inputs(rewards, mask, 'reinforce')
    g = returns_to_go(rewards, mask)
    if decay is None:
      return Advantage(g, g), ReinforceState(state.count + 1, state.baseline)
    mean_return = rewards.sum(-1).mean()
    new_b = jnp.where(state.count == 0, mean_return, decay * state.baseline + (1.0 - decay) * mean_return)
    return Advantage((g - state.baseline) * mask, g), ReinforceState(state.count + 1, new_b)

  return Transform(init, apply)
