"""Reward-model losses: unreduced per-example values [B]; reduce them with `reduce`.

All numeric options may be traced arrays (a population can vmap over them).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rmjax.objectives import _checks
from rmjax.objectives.registry import register


def _bt(d: Array, label_smoothing: Any) -> Array:
  """−(1−ε)·log σ(d) − ε·log σ(−d), written with softplus so that it is finite for any d."""
  return (1.0 - label_smoothing) * jax.nn.softplus(-d) + label_smoothing * jax.nn.softplus(d)


def _pair(r_chosen: Array, r_rejected: Array, margin: Array | None, piece: str) -> None:
  _checks.expect_rank(r_chosen, 1, '[B]', 'r_chosen', piece)
  _checks.expect(r_rejected, r_chosen.shape, '[B] like r_chosen', 'r_rejected', piece)
  if margin is not None:
    _checks.expect(margin, r_chosen.shape, '[B] like r_chosen', 'margin', piece)


@register('bradley_terry', kind='rm_loss')
def bradley_terry(margin: Any = 0.0, label_smoothing: Any = 0.0) -> Callable:
  """Bradley–Terry pairwise loss with a margin and label smoothing.

  loss_b = −(1−ε)·log σ(d_b) − ε·log σ(−d_b),   d_b = r_c − r_r − (m + m_b)

  Bradley & Terry (1952) as used for reward models by Ouyang et al. (2022); the margin m (a
  constant here, plus optional per-example m_b at call time) as in Llama 2 (Touvron et al., 2023);
  label smoothing ε is the expected loss when each preference label is flipped with probability ε
  (noise-robust BT, as in conservative DPO). All options may be traced.

  Returns:
    `loss(r_chosen [B], r_rejected [B], margin=None [B]) -> [B]`.
  """

  constant_margin = margin

  def loss(r_chosen: Float[Array, 'B'], r_rejected: Float[Array, 'B'],
           margin: Float[Array, 'B'] | None = None) -> Float[Array, 'B']:
    _pair(r_chosen, r_rejected, margin, 'bradley_terry')
    m = constant_margin if margin is None else constant_margin + margin
    return _bt(r_chosen - r_rejected - m, label_smoothing)

  return loss


@register('bt_centered', kind='rm_loss')
def bt_centered(eta: Any = 0.01, margin: Any = 0.0, label_smoothing: Any = 0.0) -> Callable:
  """Bradley–Terry plus the reward-centering penalty η·(r_c + r_r)².

  loss_b = BT(r_c, r_r; m, ε) + η·(r_c + r_r)²

  Eisenstein et al. (2023), "Helping or Herding?": the penalty pins the scale-free BT reward
  so that its mean over a pair is near zero (they use η = 0.01), which keeps ensemble members
  comparable. Options as in `bradley_terry`; all may be traced.

  Returns:
    `loss(r_chosen [B], r_rejected [B], margin=None [B]) -> [B]`.
  """
  base = bradley_terry(margin=margin, label_smoothing=label_smoothing)

  def loss(r_chosen: Float[Array, 'B'], r_rejected: Float[Array, 'B'],
           margin: Float[Array, 'B'] | None = None) -> Float[Array, 'B']:
    return base(r_chosen, r_rejected, margin) + eta * jnp.square(r_chosen + r_rejected)

  return loss


def _attribute_weights(weights: Any, a: int, piece: str) -> Array:
  if weights is None:
    return jnp.ones((a,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  _checks.expect(weights, (a,), '[A] (one weight per attribute)', 'weights', piece)
  return weights


@register('regression', kind='rm_loss')
def regression(weights: Any = None) -> Callable:
  """Squared-error regression on ratings, one head per attribute, weighted over attributes.

  loss_b = Σ_a w_a · m_ba · (ŷ_ba − y_ba)²

  Rating regression as in SteerLM / HelpSteer (Dong et al., 2023; Wang et al., 2023) and the
  multi-attribute regression stage of ArmoRM (Wang et al., 2024). `weights` [A] (default all 1)
  may be traced; m_ba masks missing ratings.

  Returns:
    `loss(pred [B, A], target [B, A], mask=None [B, A]) -> [B]`.
  """

  def loss(pred: Float[Array, 'B A'], target: Float[Array, 'B A'],
           mask: Float[Array, 'B A'] | None = None) -> Float[Array, 'B']:
    _checks.expect_rank(pred, 2, '[B, A]', 'pred', 'regression')
    _checks.expect(target, pred.shape, '[B, A] like pred', 'target', 'regression')
    m = jnp.ones_like(pred) if mask is None else jnp.asarray(mask, pred.dtype)
    _checks.expect(m, pred.shape, '[B, A] like pred', 'mask', 'regression')
    w = _attribute_weights(weights, pred.shape[1], 'regression')
    err = jnp.where(m > 0, jnp.square(pred - target), 0.0)
    return (err * w).sum(-1)

  return loss


@register('multi_objective', kind='rm_loss')
def multi_objective(weights: Any, margin: Any = 0.0, label_smoothing: Any = 0.0) -> Callable:
  """Several attribute reward heads, each trained by Bradley–Terry on its own preferences.

  loss_b = Σ_a w_a · m_ba · BT(r_c,ba − r_r,ba; m, ε)

  Multi-objective reward modeling with one head per attribute (e.g. helpfulness, harmlessness:
  Bai et al., 2022; Touvron et al., 2023), combined with weights w [A] (required; may be
  traced). m_ba marks which attributes have a preference label for pair b.

  Returns:
    `loss(r_chosen [B, A], r_rejected [B, A], label_mask=None [B, A]) -> [B]`.
  """

  def loss(r_chosen: Float[Array, 'B A'], r_rejected: Float[Array, 'B A'],
           label_mask: Float[Array, 'B A'] | None = None) -> Float[Array, 'B']:
    _checks.expect_rank(r_chosen, 2, '[B, A]', 'r_chosen', 'multi_objective')
    _checks.expect(r_rejected, r_chosen.shape, '[B, A] like r_chosen', 'r_rejected', 'multi_objective')
    m = jnp.ones_like(r_chosen) if label_mask is None else jnp.asarray(label_mask, r_chosen.dtype)
    _checks.expect(m, r_chosen.shape, '[B, A] like r_chosen', 'label_mask', 'multi_objective')
    w = _attribute_weights(weights, r_chosen.shape[1], 'multi_objective')
    per = jnp.where(m > 0, _bt(r_chosen - r_rejected - margin, label_smoothing), 0.0)
    return (per * w).sum(-1)

  return loss
