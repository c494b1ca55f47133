"""Reward transforms and reward-side regularizers: a reward signal in, a reward signal out.

Stateless pieces are `fn(reward, ctx) -> reward` with a `RewardContext` ctx; stateful ones
(`whiten`, `lagrangian`, `adaptive_kl`) are `Transform(init, apply)` with
`apply(reward, state, ctx) -> (reward, state)`. `rmjax.objectives.transform(name, **options)`
gives every piece as a `Transform`, and `chain` composes them. Rewards carry no gradient here:
every output is a reward for a policy-gradient update, not a loss.

Numeric options may be traced arrays; string and boolean options are static.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rmjax.objectives import _checks
from rmjax.objectives.base import RewardContext, Transform
from rmjax.objectives.registry import register

REFS = ('quantile', 'given')


def reference_reward(ctx: RewardContext, ref: str, q: Any, b: int, piece: str) -> Float[Array, 'B']:
  """r_ref(x) per example: the given `ctx.ref_reward` [B], or the q-quantile of the rewards of the
  reference-policy samples of each example's prompt, `ctx.ref_samples[ctx.prompt_ids]` [B, N]."""
  if ref == 'given':
    r_ref = _checks.require(ctx.ref_reward, 'ctx.ref_reward [B]', piece, "with ref='given'")
    _checks.expect(r_ref, (b,), '[B]', 'ctx.ref_reward', piece)
    return r_ref
  samples = _checks.require(ctx.ref_samples, 'ctx.ref_samples [P, N]', piece, "with ref='quantile'")
  ids = _checks.require(ctx.prompt_ids, 'ctx.prompt_ids [B]', piece, "with ref='quantile'")
  _checks.expect_rank(samples, 2, '[P, N] (prompts × reference samples)', 'ctx.ref_samples', piece)
  _checks.expect(ids, (b,), '[B]', 'ctx.prompt_ids', piece)
  return jnp.quantile(samples[ids], q, axis=-1)


def _reward_vector(reward: Array, piece: str) -> None:
  _checks.expect_rank(reward, 1, '[B] (one reward per response)', 'reward', piece)


@register('log_sigmoid', kind='reward')
def log_sigmoid(ref: str = 'quantile', q: Any = 0.5) -> Callable:
  """Log-sigmoid transform against a per-prompt reference reward: log σ(r − r_ref(x)).

  Wang et al. (2024), "Transforming and Combining Rewards for Aligning Large Language Models":
  the transform saturates above r_ref(x), so further reward there earns almost nothing, while
  poor responses are pushed up hard; it is ≤ 0 and increasing in r. r_ref(x) is the q-quantile
  (`ref='quantile'`, static; q may be traced) of the rewards of reference-policy samples for the
  prompt, or a given baseline (`ref='given'`). Computed as −softplus(r_ref − r): finite with
  finite gradient 1 − σ(r − r_ref) even for r → −∞.

  Returns:
    `fn(reward [B], ctx) -> [B]`.
  """
  _checks.one_of(ref, REFS, 'ref', 'log_sigmoid')

  def fn(reward: Float[Array, 'B'], ctx: RewardContext = RewardContext()) -> Float[Array, 'B']:
    _reward_vector(reward, 'log_sigmoid')
    return -jax.nn.softplus(reference_reward(ctx, ref, q, reward.shape[0], 'log_sigmoid') - reward)

  return fn


@register('par', kind='reward')
def par(ref: str = 'quantile', q: Any = 0.5) -> Callable:
  """Preference as reward: σ(r − r_ref(x)), in [0, 1].

  Fu et al. (2025), "Reward Shaping to Mitigate Reward Hacking in RLHF": the sigmoid of the
  reward centred on a reference response's reward is the probability, under the reward model's
  Bradley–Terry model, that the response beats the reference; it is bounded, so a hacked reward
  gains at most 1. r_ref(x) as in `log_sigmoid` (`ref` static, q may be traced).

  Returns:
    `fn(reward [B], ctx) -> [B]`.
  """
  _checks.one_of(ref, REFS, 'ref', 'par')

  def fn(reward: Float[Array, 'B'], ctx: RewardContext = RewardContext()) -> Float[Array, 'B']:
    _reward_vector(reward, 'par')
    return jax.nn.sigmoid(reward - reference_reward(ctx, ref, q, reward.shape[0], 'par'))

  return fn


@register('clip', kind='reward')
def clip(low: Any = None, high: Any = None) -> Callable:
  """Clips rewards to [low, high] (either side may be None for unbounded; not both).

  Returns:
    `fn(reward [...], ctx) -> [...]`.
  """
  if low is None and high is None:
    raise ValueError("clip: give low or high (or both); with neither it would change nothing.")

  def fn(reward: Array, ctx: RewardContext = RewardContext()) -> Array:
    del ctx
    return jnp.clip(reward, low, high)

  return fn


def _lengths(ctx: RewardContext, b: int, piece: str) -> Float[Array, 'B']:
  if ctx.lengths is not None:
    _checks.expect(ctx.lengths, (b,), '[B]', 'ctx.lengths', piece)
    return jnp.asarray(ctx.lengths, jnp.float32)
  mask = _checks.require(ctx.mask, 'ctx.lengths [B] or ctx.mask [B, T]', piece, 'to know lengths')
  _checks.expect(mask, (b, None), '[B, T]', 'ctx.mask', piece)
  return jnp.asarray(mask, jnp.float32).sum(-1)


@register('length_penalty', kind='reward')
def length_penalty(coef: Any, target: Any = 0.0) -> Callable:
  """Length penalty: r − α·max(L − L₀, 0), L the response length (`ctx.lengths` or mask sums).

  A guard against the length hacking of RLHF policies (Singhal et al., 2023, "A Long Way to
  Go"); α = `coef` and L₀ = `target` may be traced.

  Returns:
    `fn(reward [B], ctx) -> [B]`.
  """

  def fn(reward: Float[Array, 'B'], ctx: RewardContext = RewardContext()) -> Float[Array, 'B']:
    _reward_vector(reward, 'length_penalty')
    length = _lengths(ctx, reward.shape[0], 'length_penalty')
    return reward - coef * jnp.maximum(length - target, 0.0)

  return fn


@register('combine', kind='reward')
def combine(weights: Any, transform: str = 'log_sigmoid', ref: str = 'quantile', q: Any = 0.5
            ) -> Callable:
  """Weighted sum of M reward models' transformed rewards: Σ_m w_m·T(r_m − r_ref,m(x)).

  With T = log σ this is the "logical AND" of Wang et al. (2024): the sum of log-probabilities
  of beating each model's reference, high only when every property is good. `transform` is
  'log_sigmoid', 'par' or 'none' (plain weighted sum), static; `ref` and q as in `log_sigmoid`,
  read per model from `ctx.ref_reward` [M, B] or `ctx.ref_samples` [M, P, N]. Weights [M] may be
  traced.

  Returns:
    `fn(rewards [M, B], ctx) -> [B]`.
  """
  _checks.one_of(transform, ('log_sigmoid', 'par', 'none'), 'transform', 'combine')
  _checks.one_of(ref, REFS, 'ref', 'combine')
  inner = {'log_sigmoid': log_sigmoid, 'par': par}.get(transform)

  def fn(rewards: Float[Array, 'M B'], ctx: RewardContext = RewardContext()) -> Float[Array, 'B']:
    _checks.expect_rank(rewards, 2, '[M, B] (reward models × responses)', 'rewards', 'combine')
    m = rewards.shape[0]
    w = jnp.asarray(weights, jnp.float32)
    _checks.expect(w, (m,), '[M] (one weight per reward model)', 'weights', 'combine')
    if inner is None:
      return (w[:, None] * rewards).sum(0)
    per_model = ctx.ref_reward if ref == 'given' else ctx.ref_samples
    _checks.require(per_model, 'ctx.ref_reward [M, B]' if ref == 'given' else 'ctx.ref_samples [M, P, N]',
                    'combine', f'with transform={transform!r}, ref={ref!r}')
    _checks.expect(per_model, (m,) + (None,) * (1 if ref == 'given' else 2),
                   '[M, B]' if ref == 'given' else '[M, P, N]',
                   'ctx.ref_reward' if ref == 'given' else 'ctx.ref_samples', 'combine')
    t = inner(ref=ref, q=q)

    def one(r, refs):
      field = 'ref_reward' if ref == 'given' else 'ref_samples'
      return t(r, ctx._replace(**{field: refs}))

    return (w[:, None] * jax.vmap(one)(rewards, per_model)).sum(0)

  return fn


class WhitenState(NamedTuple):
  """Running moments of all rewards seen: `count` updates, `n` rewards, their mean and M2."""
  count: Int[Array, '']
  n: Float[Array, '']
  mean: Float[Array, '']
  m2: Float[Array, '']


@register('whiten', kind='reward')
def whiten(eps: Any = 1e-8, shift_mean: bool = True) -> Transform:
  """Whitening with running statistics: (r − μ)/sqrt(σ² + eps), optionally adding μ back.

  μ and σ² are the mean and population variance of every reward seen so far, this batch
  included, merged batch by batch with the parallel formula of Chan et al. (1979) — exact, and
  stable where Σr² − (Σr)²/n is not. With `shift_mean=False` (static) the result is
  (r − μ)/sqrt(σ² + eps) + μ: the scale is normalised but the mean kept (as PPO reward
  whitening in TRL does). eps may be traced.

  Returns:
    `Transform`: `init() -> WhitenState`; `apply(reward [B], state, ctx) -> ([B], state)`.
  """

  def init() -> WhitenState:
    zero = jnp.zeros((), jnp.float32)
    return WhitenState(jnp.zeros((), jnp.int32), zero, zero, zero)

  def apply(reward: Float[Array, 'B'], state: WhitenState, ctx: RewardContext = RewardContext()
            ) -> tuple[Float[Array, 'B'], WhitenState]:
    del ctx
    _reward_vector(reward, 'whiten')
    nb = jnp.float32(reward.shape[0])
    mb = reward.mean()
    m2b = jnp.square(reward - mb).sum()
    n = state.n + nb
    delta = mb - state.mean
    mean = state.mean + delta * nb / n
    m2 = state.m2 + m2b + jnp.square(delta) * state.n * nb / n
    out = (reward - mean) * jax.lax.rsqrt(m2 / n + eps)
    if not shift_mean:
      out = out + mean
    return out, WhitenState(state.count + 1, n, mean, m2)

  return Transform(init, apply)


class LagrangianState(NamedTuple):
  """Dual-ascent state: `count` updates and the multipliers λ [C]."""
  count: Int[Array, '']
  multipliers: Float[Array, 'C']


@register('lagrangian', kind='reward')
def lagrangian(thresholds: Any, lr: Any = 0.01, init_multiplier: Any = 1.0, constraint: str = 'ge'
               ) -> Transform:
  """Constrained RLHF by a Lagrangian over reward components (after Moskovitz et al., 2024).

  "Confronting Reward Model Overoptimization with Constrained RLHF": each component reward
  model c must reach (`constraint='ge'`, E[r_c] ≥ θ_c) or hold (`'eq'`, E[r_c] = θ_c) its
  threshold θ_c — the proxy point beyond which it overoptimizes — and the policy maximises the
  Lagrangian reward

    r_b = Σ_c λ_c·(r_cb − θ_c)

  while the multipliers follow dual ascent on the batch means,
  λ_c ← λ_c − η·(mean_b r_cb − θ_c), projected onto λ ≥ 0 for 'ge': a constraint that is
  violated gains weight, one that is met loses it. The returned reward uses the multipliers
  before the update. θ [C], η = `lr` and the initial λ may be traced; `constraint` is static.

  Returns:
    `Transform`: `init() -> LagrangianState`; `apply(components [C, B], state, ctx) -> ([B], state)`.
  """
  _checks.one_of(constraint, ('ge', 'eq'), 'constraint', 'lagrangian')
  theta = jnp.asarray(thresholds, jnp.float32)
  _checks.expect_rank(theta, 1, '[C] (one threshold per component)', 'thresholds', 'lagrangian')

  def init() -> LagrangianState:
    lam = jnp.broadcast_to(jnp.asarray(init_multiplier, jnp.float32), theta.shape)
    return LagrangianState(jnp.zeros((), jnp.int32), lam)

  def apply(components: Float[Array, 'C B'], state: LagrangianState,
            ctx: RewardContext = RewardContext()) -> tuple[Float[Array, 'B'], LagrangianState]:
    del ctx
    _checks.expect(components, (theta.shape[0], None), '[C, B] (components × responses)',
                   'components', 'lagrangian')
    lam = state.multipliers
    reward = (lam[:, None] * (components - theta[:, None])).sum(0)
    new = lam - lr * (components.mean(-1) - theta)
    if constraint == 'ge':
      new = jnp.maximum(new, 0.0)
    return reward, LagrangianState(state.count + 1, new)

  return Transform(init, apply)


def _token_inputs(reward: Array, ctx: RewardContext, piece: str) -> tuple[Array, Array, Array]:
  """Checks ctx.logp / ref_logp / mask [B, T]; returns (token rewards [B, T], log-ratio, mask).

  A [B] sequence reward is placed on the last valid token of each row (zero for an empty row).
  """
  logp = _checks.require(ctx.logp, 'ctx.logp [B, T]', piece, 'for a per-token penalty')
  ref_logp = _checks.require(ctx.ref_logp, 'ctx.ref_logp [B, T]', piece, 'for a per-token penalty')
  mask = _checks.require(ctx.mask, 'ctx.mask [B, T]', piece, 'for a per-token penalty')
  _checks.expect_rank(logp, 2, '[B, T]', 'ctx.logp', piece)
  _checks.expect(ref_logp, logp.shape, '[B, T] like ctx.logp', 'ctx.ref_logp', piece)
  _checks.expect(mask, logp.shape, '[B, T] like ctx.logp', 'ctx.mask', piece)
  mask = jnp.asarray(mask, jnp.float32)
  b, t = logp.shape
  if reward.ndim == 1:
    _checks.expect(reward, (b,), '[B] or [B, T]', 'reward', piece)
    last = t - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)
    onehot = jax.nn.one_hot(last, t) * (mask.sum(-1, keepdims=True) > 0)
    reward = reward[:, None] * onehot
  else:
    _checks.expect(reward, (b, t), '[B] or [B, T]', 'reward', piece)
  logratio = jnp.where(mask > 0, logp - ref_logp, 0.0)
  return jnp.where(mask > 0, reward, 0.0), jax.lax.stop_gradient(logratio), mask


@register('kl_penalty', kind='reward')
def kl_penalty(beta: Any) -> Callable:
  """Per-token KL penalty on the reward: r_t − β·(log π(y_t) − log π_ref(y_t)) on valid tokens.

  Ziegler et al. (2019), Stiennon et al. (2020), Ouyang et al. (2022). The sampled log-ratio is
  the k1 estimate; its sum over a response estimates KL(π‖π_ref) of that prompt. A [B] sequence
  reward is first placed on the last valid token. β may be traced.

  Returns:
    `fn(reward [B] or [B, T], ctx with logp, ref_logp, mask) -> [B, T]`.
  """

  def fn(reward: Array, ctx: RewardContext = RewardContext()) -> Float[Array, 'B T']:
    tokens, logratio, mask = _token_inputs(reward, ctx, 'kl_penalty')
    return tokens - beta * logratio * mask

  return fn


class AdaptiveKLState(NamedTuple):
  """Controller state: `count` updates and the current coefficient β."""
  count: Int[Array, '']
  coef: Float[Array, '']


@register('adaptive_kl', kind='reward')
def adaptive_kl(target: Any, init_coef: Any = 0.1, rate: Any = 0.1, clip_error: Any = 0.2
                ) -> Transform:
  """The adaptive KL penalty of Ziegler et al. (2019): a proportional controller on β.

  Applies `kl_penalty` with the current β, then, from the batch's mean sequence KL estimate
  KL = mean_b Σ_t (log π − log π_ref), updates

    e = clip(KL / KL_target − 1, −c, c),   β ← β·(1 + K_β·e)

  with K_β = `rate` (0.1 in the paper) and c = `clip_error` (0.2): β grows when the policy is
  further than the target from π_ref and shrinks when it is closer. All options may be traced.

  Returns:
    `Transform`: `init() -> AdaptiveKLState`; `apply(reward [B] or [B, T], state, ctx) -> ([B, T], state)`.
  """
  _checks.positive(target, 'target', 'adaptive_kl')

  def init() -> AdaptiveKLState:
    return AdaptiveKLState(jnp.zeros((), jnp.int32), jnp.asarray(init_coef, jnp.float32))

  def apply(reward: Array, state: AdaptiveKLState, ctx: RewardContext = RewardContext()
            ) -> tuple[Float[Array, 'B T'], AdaptiveKLState]:
    tokens, logratio, mask = _token_inputs(reward, ctx, 'adaptive_kl')
    out = tokens - state.coef * logratio * mask
    kl = (logratio * mask).sum(-1).mean()
    error = jnp.clip(kl / target - 1.0, -clip_error, clip_error)
    return out, AdaptiveKLState(state.count + 1, state.coef * (1.0 + rate * error))

  return Transform(init, apply)


@register('chi2', kind='reward')
def chi2(coef: Any, max_ratio: Any = 10.0, min_chi2: Any = 1e-3) -> Callable:
  """χ² occupancy-measure regularizer λ·√χ²(μ_π‖μ_ref), applied on the reward (Laidlaw et al.).

  Laidlaw et al. (2024), "Correlated Proxies: A New Definition and Improved Mitigation for Reward
  Hacking", regularize the divergence of occupancy measures; their ORPO applies the gradient of
  λ·√χ² as a reward term, subtracting (λ/√χ̂²)·(μ_π/μ_ref)(s_t, a_t) from each per-token reward.
  They estimate the ratio with a discriminator; here the transitions are deterministic (the
  state is the prefix), so the ratio of the prefix up to token t is exactly

    w_t = exp Σ_{i≤t} (log π(y_i) − log π_ref(y_i)),

  clipped to [0, `max_ratio`] (default 10) to bound the variance. χ̂² = mean over valid tokens
  of w_t − 1 (since χ²(μ‖ν) = E_μ[μ/ν] − 1 under on-policy samples), floored at `min_chi2` so
  that λ/√χ̂² stays finite at π = π_ref. Per-token: r_t − (λ/√χ̂²)·w_t. All options may be traced.
  For a per-token (not occupancy) quantity see the `chi2_token` loss.

  Returns:
    `fn(reward [B] or [B, T], ctx with logp, ref_logp, mask) -> [B, T]`.
  """

  def fn(reward: Array, ctx: RewardContext = RewardContext()) -> Float[Array, 'B T']:
    tokens, logratio, mask = _token_inputs(reward, ctx, 'chi2')
    w = jnp.clip(jnp.exp(jnp.cumsum(logratio, axis=-1)), 0.0, max_ratio) * mask
    chi2_hat = jnp.maximum(w.sum() / jnp.maximum(mask.sum(), 1.0) - 1.0, min_chi2)
    return tokens - coef * jax.lax.rsqrt(chi2_hat) * w

  return fn
