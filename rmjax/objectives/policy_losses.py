"""Policy losses and loss-side regularizers: unreduced per-token losses plus per-token metrics.

Every piece is `fn(batch: PolicyBatch) -> (loss [B, T], metrics)`, zero on padding; metrics is a
dict of [B, T] arrays. The trainer sums the pieces (`sum_losses`) and reduces once, with
`reduce`. Log-probs `batch.logp` (and logits) carry the gradient; old and reference log-probs
and advantages are treated as constants. Coefficients may be traced; booleans are static.

Which KL each estimator optimises when used as a loss (`../shared/PITFALLS.md` #1–2), with
samples y ~ π held fixed and r = π_ref(y)/π(y):

  kl_k1 = −log r          value unbiased for KL(π‖π_ref); expected gradient E[∇k1] = 0
  kl_k2 = ½·(log r)²      value biased; expected gradient = ∇KL(π‖π_ref)
  kl_k3 = (r − 1) − log r value unbiased for KL(π‖π_ref), ≥ 0; expected gradient = ∇KL(π_ref‖π)
  kl_exact                Σ_v π(v)·(log π(v) − log π_ref(v)) over the vocabulary: exact KL(π‖π_ref)
                          per token and its exact gradient
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rmjax.objectives import _checks
from rmjax.objectives.registry import register

Metrics = dict[str, Array]


class PolicyBatch(NamedTuple):
  """Per-token inputs of policy losses; fields a piece does not use may be None.

  Attributes:
    logp: [B, T] log π_θ of the sampled tokens (differentiated).
    mask: [B, T] 1 on response tokens.
    advantages: [B, T].
    old_logp: [B, T] log-probs of the policy that sampled the batch.
    ref_logp: [B, T] log-probs of the reference policy.
    values: [B, T] value-head predictions (differentiated).
    old_values: [B, T] value predictions at sampling time.
    returns: [B, T] value targets.
    logits: [B, T, V] policy logits (differentiated), for exact per-token terms.
    ref_logits: [B, T, V] reference logits.
  """
  logp: Float[Array, 'B T']
  mask: Float[Array, 'B T']
  advantages: Float[Array, 'B T'] | None = None
  old_logp: Float[Array, 'B T'] | None = None
  ref_logp: Float[Array, 'B T'] | None = None
  values: Float[Array, 'B T'] | None = None
  old_values: Float[Array, 'B T'] | None = None
  returns: Float[Array, 'B T'] | None = None
  logits: Float[Array, 'B T V'] | None = None
  ref_logits: Float[Array, 'B T V'] | None = None


def _field(batch: PolicyBatch, name: str, piece: str, v: bool = False) -> Array:
  """The [B, T] (or [B, T, V] if v) field `name`, checked against batch.logp."""
  if not isinstance(batch, PolicyBatch):
    raise ValueError(f'{piece}: pass a PolicyBatch, got {type(batch).__name__}.')
  _checks.expect_rank(batch.logp, 2, '[B, T]', 'batch.logp', piece)
  x = _checks.require(getattr(batch, name), f'batch.{name}', piece, f'by {piece}')
  shape = batch.logp.shape + ((None,) if v else ())
  _checks.expect(x, shape, '[B, T, V]' if v else '[B, T] like batch.logp', f'batch.{name}', piece)
  return x


def _mask(batch: PolicyBatch, piece: str) -> Array:
  return jnp.asarray(_field(batch, 'mask', piece), jnp.float32)


def _masked(loss: Array, mask: Array) -> Array:
  return jnp.where(mask > 0, loss, 0.0)


@register('ppo_clip', kind='policy_loss')
def ppo_clip(eps: Any = 0.2, dual_clip: Any = None) -> Callable:
  """PPO's clipped surrogate (Schulman et al., 2017), with optional dual clip (Ye et al., 2020).

    ρ = exp(log π − log π_old),   ℓ = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))

  With `dual_clip` = c > 1, tokens with A < 0 are further bounded, ℓ = min(ℓ, −c·A), so that a
  huge ratio on a bad token cannot blow the loss up. ε and c may be traced. Metrics:
  `clipped` (1 where the clipped branch is active), `ratio`.
  """
  if dual_clip is not None:
    _checks.positive(dual_clip - 1.0, 'dual_clip - 1 (dual_clip must exceed 1)', 'ppo_clip')

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    mask = _mask(batch, 'ppo_clip')
    adv = jax.lax.stop_gradient(_field(batch, 'advantages', 'ppo_clip'))
    old = jax.lax.stop_gradient(_field(batch, 'old_logp', 'ppo_clip'))
    ratio = jnp.exp(jnp.where(mask > 0, batch.logp - old, 0.0))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
      loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
    metrics = {'clipped': _masked((clipped > unclipped).astype(jnp.float32), mask),
               'ratio': _masked(ratio, mask)}
    return _masked(loss, mask), metrics

  return fn


@register('pg', kind='policy_loss')
def pg() -> Callable:
  """Plain policy gradient (Williams, 1992): ℓ_t = −A_t·log π(y_t), A held constant."""

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    mask = _mask(batch, 'pg')
    adv = jax.lax.stop_gradient(_field(batch, 'advantages', 'pg'))
    return _masked(-adv * batch.logp, mask), {}

  return fn


@register('value', kind='policy_loss')
def value(clip: Any = None, coef: Any = 1.0) -> Callable:
  """Value loss, optionally clipped around the old values as in PPO's implementations.

    ℓ = coef·½·(V − R)²,   or with clip c:   coef·½·max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)

  (Schulman et al., 2017; the clipped form of the OpenAI baselines, examined by Engstrom et al.,
  2020). c and coef may be traced.
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    mask = _mask(batch, 'value')
    v = _field(batch, 'values', 'value')
    ret = jax.lax.stop_gradient(_field(batch, 'returns', 'value'))
    err = jnp.square(v - ret)
    if clip is not None:
      old = jax.lax.stop_gradient(_field(batch, 'old_values', 'value'))
      err = jnp.maximum(err, jnp.square(old + jnp.clip(v - old, -clip, clip) - ret))
    return _masked(coef * 0.5 * err, mask), {}

  return fn


def _logratio(batch: PolicyBatch, piece: str) -> tuple[Array, Array]:
  """(log π − log π_ref masked to 0 on padding, mask)."""
  mask = _mask(batch, piece)
  ref = jax.lax.stop_gradient(_field(batch, 'ref_logp', piece))
  return jnp.where(mask > 0, batch.logp - ref, 0.0), mask


@register('kl_k1', kind='policy_loss')
def kl_k1(coef: Any) -> Callable:
  """KL estimator k1 = log π − log π_ref (Schulman, 2020, "Approximating KL Divergence"), × coef.

  Unbiased in value for KL(π‖π_ref); as a loss its expected gradient is zero (E_π[∇log π] = 0),
  so it does not pull π toward π_ref — use it in the reward (`kl_penalty`), not as a loss.
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    lr, mask = _logratio(batch, 'kl_k1')
    return _masked(coef * lr, mask), {'kl_k1': lr}

  return fn


@register('kl_k2', kind='policy_loss')
def kl_k2(coef: Any) -> Callable:
  """KL estimator k2 = ½·(log π − log π_ref)² (Schulman, 2020), × coef.

  Biased in value, but its expected gradient is exactly ∇KL(π‖π_ref): the loss to use for the
  reverse KL toward π_ref.
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    lr, mask = _logratio(batch, 'kl_k2')
    k2 = 0.5 * jnp.square(lr)
    return _masked(coef * k2, mask), {'kl_k2': k2}

  return fn


@register('kl_k3', kind='policy_loss')
def kl_k3(coef: Any) -> Callable:
  """KL estimator k3 = (r − 1) − log r, r = π_ref/π (Schulman, 2020), × coef; the GRPO KL term.

  k3 ≥ 0 and unbiased in value for KL(π‖π_ref), but as a loss its expected gradient is
  ∇KL(π_ref‖π), the other direction (mass-covering). Computed as expm1(−x) + x, x = log π − log π_ref.
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    lr, mask = _logratio(batch, 'kl_k3')
    k3 = jnp.expm1(-lr) + lr
    return _masked(coef * k3, mask), {'kl_k3': k3}

  return fn


def _log_softmax_pair(batch: PolicyBatch, piece: str) -> tuple[Array, Array, Array]:
  """(log π [B, T, V], log π_ref [B, T, V] as a constant, mask)."""
  mask = _mask(batch, piece)
  logits = _field(batch, 'logits', piece, v=True)
  ref_logits = _field(batch, 'ref_logits', piece, v=True)
  _checks.expect(ref_logits, logits.shape, '[B, T, V] like batch.logits', 'batch.ref_logits', piece)
  return (jax.nn.log_softmax(logits, -1),
          jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, -1)), mask)


@register('kl_exact', kind='policy_loss')
def kl_exact(coef: Any) -> Callable:
  """Exact per-token KL(π‖π_ref) = Σ_v π(v)·(log π(v) − log π_ref(v)) from both logits, × coef.

  No sampling noise in value or gradient; costs one pass over the vocabulary per token.
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    logp, ref, mask = _log_softmax_pair(batch, 'kl_exact')
    kl = (jnp.exp(logp) * (logp - ref)).sum(-1)
    return _masked(coef * kl, mask), {'kl_exact': _masked(kl, mask)}

  return fn


@register('chi2_token', kind='policy_loss')
def chi2_token(coef: Any) -> Callable:
  """Per-token χ²(π‖π_ref) = Σ_v π(v)²/π_ref(v) − 1, exact over the vocabulary, × coef.

  A surrogate, not the occupancy-measure χ² of Laidlaw et al. (the `chi2` reward transform): it
  compares next-token distributions at each visited prefix and ignores how the prefix
  distribution itself drifts, which the occupancy measure compounds over the response.
  Computed as expm1(logsumexp(2·log π − log π_ref)).
  """

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    logp, ref, mask = _log_softmax_pair(batch, 'chi2_token')
    c2 = jnp.expm1(jax.nn.logsumexp(2.0 * logp - ref, axis=-1))
    return _masked(coef * c2, mask), {'chi2_token': _masked(c2, mask)}

  return fn


@register('entropy', kind='policy_loss')
def entropy(coef: Any) -> Callable:
  """Entropy bonus: ℓ_t = −coef·H(π(·|prefix_t)), H = −Σ_v π(v)·log π(v) from the logits."""

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    mask = _mask(batch, 'entropy')
    logp = jax.nn.log_softmax(_field(batch, 'logits', 'entropy', v=True), -1)
    h = -(jnp.exp(logp) * logp).sum(-1)
    return _masked(-coef * h, mask), {'entropy': _masked(h, mask)}

  return fn


def sum_losses(*pieces: Callable) -> Callable:
  """Sums policy-loss pieces: `fn(batch) -> (Σ_i loss_i [B, T], merged metrics)`.

  Raises:
    ValueError: if no piece is given or two pieces report the same metric name.
  """
  if not pieces:
    raise ValueError('sum_losses: give at least one policy-loss piece, e.g. get("ppo_clip").')

  def fn(batch: PolicyBatch) -> tuple[Float[Array, 'B T'], Metrics]:
    total, metrics = None, {}
    for piece in pieces:
      loss, m = piece(batch)
      clash = set(m) & set(metrics)
      if clash:
        raise ValueError(f'sum_losses: metric(s) {", ".join(sorted(clash))} reported twice; '
                         'use each piece once.')
      metrics.update(m)
      total = loss if total is None else total + loss
    return total, metrics

  return fn
