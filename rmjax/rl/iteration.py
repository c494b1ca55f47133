"""One RL iteration as one compiled program: rollout, scores, rewards, advantages, updates.

`make_iteration(...)` returns a `jax.jit`-ed `iteration(state, frozen, batch) -> (state,
metrics)` (state donated, static shapes) whose single XLA program holds

  1. the rollout: each of the P prompts `[P, Lp]` (left-padded) sampled k = `group_size`
     times in consecutive rows (B = P·k), N = `max_new_tokens` tokens drawn by the KV-cache
     sampler (`rmjax.models.sampling`, one `lax.scan` over tokens; each prompt prefilled once);
  2. no-cache forward passes of the policy and of the frozen reference over prompt +
     response (`[B, Lp + N]`), giving log π_T and log π_ref,T of the sampled tokens, the
     entropy and the exact per-token KL, all under the temperature-scaled softmax
     `log_softmax(logits / T)` that the sampler's `policy_logprobs` are taken from;
  3. the reward model(s) `scorer(params, tokens, mask) -> [K, B]` on the whole sequence
     (read at the last real token: the EOS of a finished response, the last token of a
     truncated one; `../shared/PITFALLS.md` #6);
  4. the objective's reward chain (`rmjax.objectives`: aggregation, transforms, a KL penalty
     or the adaptive KL controller, whose state is carried in `RLState.reward_state`) on
     those scores, the sequence reward placed on the last real response token, then the
     optional missing-EOS penalty `−missing_eos_penalty` on that token for a response that
     ran out of tokens without EOS;
  5. advantages (`gae` with a value model, `rloo`, `grpo`, `dr_grpo`, `reinforce`);
  6. `epochs` × `minibatches` optimizer updates as two nested `lax.scan`s over random
     permutations of the B rows. Each minibatch loss is reduced with the normaliser of the
     whole rollout divided by `minibatches` (`rmjax.objectives.reduction`), so each token has
     the same weight in every step whatever the split (`../shared/PITFALLS.md` #4).

With one epoch of one minibatch (and no value model) steps 2 and 6 share the policy's forward
pass: `jax.vjp` of the policy's response logits gives the log-probs of step 2 and, once the
loss's gradient with respect to those logits is known, the update's parameter gradient, so the
policy runs forward once per iteration, as in a trainer that takes the old log-probs from its
own update (`make_functions(one_pass=False)` keeps the separate pass). There the rows keep their
rollout order, and the policy's and the reference's passes run each prompt once per group
(`transformer.shared_prompt_logits`).

The sampler's `policy_logprobs` agree with the trainer's no-cache recomputation of the same
quantity to float32 rounding (metric `logp_mismatch`: max |Δ| / max(|log p|, 1), a few ulps,
whatever the temperature and truncation). The "old" log-probs of the PPO ratio are the
trainer's recomputation from step 2, so the ratio on the first minibatch of the first epoch is
the same function of the same parameters and equals 1 to rounding (metric `ratio_dev_first`,
`../shared/PITFALLS.md` #7). The reference is scored at the same temperature T as the policy,
so every KL is between the two temperature-scaled distributions.

Per-row layout of a rollout: tokens `[B, L]` with L = Lp + N (prompt left-padded, response
right-padded with `pad_id` after EOS), response quantities `[B, N]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmjax import objectives
from rmjax.models import sampling, transformer, value_model
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import last_index
from rmjax.objectives import Objective, PolicyBatch, RewardContext, RewardStats, Transform
from rmjax.train import accumulate

Scorer = Callable[[Any, jax.Array, jax.Array], jax.Array]
"""`scorer(params, tokens [B, L], mask [B, L]) -> scores [K, B]`, e.g. `RewardModel(...).apply`."""

_EXACT_LOSSES = ('kl_exact', 'chi2_token')
ATTENTION_ELEMENTS = 1 << 21
"""`row_chunks='auto'` budget: attention scores (rows × heads × L²) per row block, 8 MiB in float32,
a quarter of the 32 MiB L3 cache of the 2-core machine it was measured on."""


class RLState(NamedTuple):
  """Everything an iteration reads and writes (and a checkpoint stores).

  step: int32 [], iterations done (and the index of the next prompt batch).
  params: `{'policy': LM params}` plus `'value': value-model params` for GAE.
  opt_state: the optax state of `params`.
  rng: uint32 key data [2]; iteration s uses `fold_in(rng, s)`.
  reward_state: the reward chain's state (e.g. the adaptive KL coefficient).
  advantage_state: the state of a stateful advantage estimator (`reinforce`), else ().
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  reward_state: Any
  advantage_state: Any


class Frozen(NamedTuple):
  """Arrays an iteration reads but never changes; an explicit argument, not a compiled constant.

  ref_params: the reference policy's LM params.
  reward_params: the proxy scorer's params.
  stats: per-member `RewardStats` of the proxy (used by aggregations), or None.
  gold_params: the gold scorer's params, or None when no gold scorer is configured.
  ref_samples: `[P_all, N]` rewards of N reference-policy samples per prompt id, for reward
    transforms against a per-prompt reference (`log_sigmoid`, `par` with ref='quantile'), or None.
  """
  ref_params: Any
  reward_params: Any
  stats: RewardStats | None = None
  gold_params: Any = None
  ref_samples: Any = None


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static settings of an iteration.

  group_size: k samples per prompt (consecutive rows). max_new_tokens: N.
  temperature (> 0), top_k (0 = off), top_p (1.0 = off): the sampling distribution; the
    trainer's log-probs are those of `log_softmax(logits / temperature)`.
  eos_id / pad_id: end-of-sequence (None: no EOS) and padding ids.
  epochs, minibatches: update passes over the rollout and minibatches per pass (B must be a
    multiple of `minibatches`).
  missing_eos_penalty: subtracted from the reward of a response without EOS (None: off).
  row_chunks: row blocks (a `lax.map`) for the forward passes over the whole rollout — the
    scorers', and with `one_pass` the policy's and the reference's; B must be a multiple. 'auto':
    `accumulate.auto_steps` over the P groups of k rows with a budget of `ATTENTION_ELEMENTS`
    attention scores (heads · L² a row), so on a single CPU device each block's scores stay
    cache-sized (tiny, 32 rows × 256 tokens: a forward pass 97 → 32 ms in 4 blocks) and each block
    holds whole groups (their prompts then run once, see `make_functions`); 1 on accelerators and
    meshes.
  """
  group_size: int = 1
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None
  pad_id: int = 0
  epochs: int = 1
  minibatches: int = 1
  missing_eos_penalty: float | None = None
  row_chunks: int | str = accumulate.AUTO

  def __post_init__(self):
    for name in ('group_size', 'max_new_tokens', 'epochs', 'minibatches'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'rl Settings.{name}={value!r}: must be a positive int.')
    if self.row_chunks != accumulate.AUTO and (not isinstance(self.row_chunks, int) or self.row_chunks < 1):
      raise ValueError(f"rl Settings.row_chunks={self.row_chunks!r}: must be a positive int or '{accumulate.AUTO}'.")
    if not self.temperature > 0:
      raise ValueError(f'rl Settings.temperature={self.temperature!r}: must be > 0 (greedy decoding has no '
                       'policy gradient).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'rl Settings.top_p={self.top_p!r}: must be in (0, 1].')
    if self.missing_eos_penalty is not None and self.eos_id is None:
      raise ValueError('rl Settings.missing_eos_penalty needs eos_id (without EOS every response is truncated).')


class Rollout(NamedTuple):
  """What the update scan reads, one row per response (`[B, ...]`)."""
  tokens: jax.Array
  mask: jax.Array
  response_mask: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  advantages: jax.Array
  returns: jax.Array
  old_values: jax.Array | None
  ref_logits: jax.Array | None


class Samples(NamedTuple):
  """A rollout's sequences and scores: tokens, mask [B, L]; scores [K, B]; gold [B] or None."""
  tokens: jax.Array
  mask: jax.Array
  scores: jax.Array
  gold: jax.Array | None


class Functions(NamedTuple):
  """The pure pieces returned by `make_functions`."""
  iteration: Callable
  evaluate: Callable
  minibatch_loss: Callable
  iteration_samples: Callable


def loss_names(objective_section: Any) -> list[str]:
  """The policy-loss piece names selected by `objective_section.loss`."""
  loss = objective_section['loss'] if 'loss' in objective_section else None
  if isinstance(loss, str):
    return [n.strip() for n in loss.split(',') if n.strip()]
  return list(loss or ())


def uses_value(objective_section: Any) -> bool:
  """Whether the objective needs a value model (its advantage is `gae`)."""
  return 'advantage' in objective_section and objective_section['advantage'] == 'gae'


def response_logits(params, config: ModelConfig, tokens: jax.Array, mask: jax.Array, prompt_len: int,
                    temperature: float, group_size: int = 1) -> jax.Array:
  """`logits / T` `[B, N, V]` predicting response tokens `tokens[:, prompt_len:]` (the LM head runs on
  those N positions only). With `group_size` k > 1 the rows are groups of k consecutive rows with
  one prompt, as a rollout's are: each prompt runs once (`transformer.shared_prompt_logits`)."""
  if group_size > 1:
    return transformer.shared_prompt_logits(params, config, tokens, mask, prompt_len, group_size) / temperature
  return transformer.lm_logits(params, config, tokens, mask, head_slice=slice(prompt_len - 1, -1)) / temperature


def picked(logp_all: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """`logp_all[b, t, tokens[b, t]]` `[B, N]`, 0 where mask is False."""
  out = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
  return jnp.where(mask, out, 0.0)


def token_rewards(seq_or_tokens: jax.Array, response_mask: jax.Array) -> jax.Array:
  """A `[B]` sequence reward on the last real response token, or `[B, N]` token rewards kept; `[B, N]`."""
  b, n = response_mask.shape
  if seq_or_tokens.shape == (b,):
    onehot = jax.nn.one_hot(last_index(response_mask), n) * jnp.any(response_mask, -1, keepdims=True)
    return seq_or_tokens[:, None] * onehot
  if seq_or_tokens.shape == (b, n):
    return jnp.where(response_mask, seq_or_tokens, 0.0)
  raise ValueError(f'rl iteration: the reward chain returned shape {seq_or_tokens.shape}; expected [B] = ({b},) '
                   f'or [B, N] = ({b}, {n}). Start config.objective.reward with an aggregation of the [K, B] '
                   "scores (e.g. 'mean').")


def by_rows(fn: Callable, chunks: int, *rows: jax.Array) -> Any:
  """`fn(*rows)` computed on `chunks` consecutive row blocks of `rows` (each `[B, ...]`) in a `lax.map`;
  every output leaf is `[B, ...]` again."""
  if chunks == 1:
    return fn(*rows)
  b = rows[0].shape[0]
  out = jax.lax.map(lambda block: fn(*block), tuple(x.reshape(chunks, b // chunks, *x.shape[1:]) for x in rows))
  return jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), out)


def has_eos(tokens: jax.Array, response_mask: jax.Array, eos_id: int | None) -> jax.Array:
  """`[B]` bool: the response holds `eos_id` among its real tokens."""
  if eos_id is None:
    return jnp.zeros(tokens.shape[:1], bool)
  return jnp.any((tokens == eos_id) & response_mask, axis=-1)


def place_rewards(shaped: jax.Array, response_tokens: jax.Array, response_mask: jax.Array, eos_id: int | None,
                  missing_eos_penalty: float | None) -> tuple[jax.Array, jax.Array]:
  """Token rewards `[B, N]` from the reward chain's output, and `finished [B]` (EOS present).

  A `[B]` reward goes on the last real response token (the EOS of a finished response, the
  last token of a truncated one); with `missing_eos_penalty` = c, a response without EOS gets
  −c on that same token (`../shared/PITFALLS.md` #6).
  """
  rewards = token_rewards(shaped, response_mask)
  finished = has_eos(response_tokens, response_mask, eos_id)
  if missing_eos_penalty is not None:
    rewards = rewards - missing_eos_penalty * token_rewards((~finished).astype(jnp.float32), response_mask)
  return rewards, finished


def rank_correlation(x: jax.Array, y: jax.Array) -> jax.Array:
  """Spearman's ρ of two `[B]` vectors: Pearson's correlation of their ranks (ties ranked by order)."""
  rx = jnp.argsort(jnp.argsort(x)).astype(jnp.float32)
  ry = jnp.argsort(jnp.argsort(y)).astype(jnp.float32)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  return (rx * ry).sum() / jnp.sqrt(jnp.maximum((rx * rx).sum() * (ry * ry).sum(), 1e-12))


def adaptive_kl_coefs(reward_state: Any) -> list[jax.Array]:
  """The β of every adaptive KL controller in a reward-chain state."""
  is_kl = lambda x: isinstance(x, objectives.AdaptiveKLState)
  return [s.coef for s in jax.tree.leaves(reward_state, is_leaf=is_kl) if is_kl(s)]


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, objective: Objective
               ) -> RLState:
  """A fresh `RLState` for `params` (`{'policy': ..., ['value': ...]}`) at step 0."""
  if 'policy' not in params:
    raise ValueError(f"rl init_state: params must be {{'policy': ..., ['value': ...]}}; got keys {sorted(params)}.")
  adv = objective.advantage
  rng = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng,
                 reward_state=objective.init_reward_state(),
                 advantage_state=adv.init() if isinstance(adv, Transform) else ())


def init_params(rng: jax.Array, policy_params: Any, value_config: ModelConfig | None,
                value_backbone: Any = None) -> dict:
  """`{'policy': policy_params}` plus a fresh value model when `value_config` is given; its backbone
  starts from `value_backbone` (e.g. the policy's or a reward model's) when given. The arrays are
  copies, so the state (which an iteration donates) never aliases the frozen reference."""
  params = {'policy': jax.tree.map(jnp.array, policy_params)}
  if value_config is not None:
    v = value_model.init_value_model(rng, value_config)
    if value_backbone is not None:
      v = {**v, 'backbone': jax.tree.map(jnp.array, value_backbone)}
    params['value'] = v
  return params


def make_functions(policy_config: ModelConfig, objective_section: Any, settings: Settings, scorer: Scorer,
                   optimizer: optax.GradientTransformation, *, value_config: ModelConfig | None = None,
                   gold_scorer: Scorer | None = None, one_pass: bool = True):
  """The pure pieces of an iteration as `Functions`, none jitted.

  one_pass: with one epoch, one minibatch and no value model, the rollout's log π_T (the "old"
    log-probs, the reward chain's log π, the entropy and KL metrics) come from the update's own
    forward pass (`jax.vjp`), so the policy runs forward once per iteration instead of twice;
    the update is the same (the ratio is exactly 1; within 1e-6 when `row_chunks` splits the
    rows). Its passes (policy and reference) run each prompt once per group of k rows
    (`transformer.shared_prompt_logits`) where the row blocks hold whole groups. False keeps the
    separate pass (for checks).

  iteration(state, frozen, batch) -> (state, metrics); batch: `prompt_tokens [P, Lp]` int32,
    `prompt_mask [P, Lp]` bool (left-padded), optional `prompt_ids [P]` int32.
  evaluate(state, frozen, batch, key) -> (metrics, Samples): the rollout part alone.
  iteration_samples(state, frozen, batch) -> (state, metrics, Samples): the iteration, also
    returning the rollout it trained on.
  minibatch_loss(params, rollout, normalizer) -> (loss, aux): the reduced policy loss of some
    rows of a `Rollout` (with `normalizer` from the whole rollout) — exposed for tests of the
    reduction contract.
  """
  objective = objectives.build(objective_section)
  if objective.loss is None:
    raise ValueError("rl: config.objective.loss is empty; select a policy loss, e.g. 'ppo_clip'.")
  if objective.advantage is None:
    raise ValueError("rl: config.objective.advantage is empty; select one of gae, rloo, grpo, dr_grpo, reinforce.")
  names = loss_names(objective_section)
  use_value = uses_value(objective_section)
  if use_value and value_config is None:
    raise ValueError("rl: advantage 'gae' bootstraps from a value model; pass value_config.")
  if use_value and 'value' not in names:
    raise ValueError("rl: advantage 'gae' needs the 'value' loss in config.objective.loss (e.g. "
                     "'ppo_clip,value'), or the value model is never trained.")
  if not use_value and value_config is not None:
    raise ValueError(f"rl: value_config is given but advantage {objective_section['advantage']!r} uses no values.")
  need_ref_logits = any(n in _EXACT_LOSSES for n in names)
  s = settings
  temp = float(s.temperature)

  def policy_logits(params, tokens, mask, prompt_len, group=1):
    return response_logits(params, policy_config, tokens, mask, prompt_len, temp, group)

  def response_values(params, tokens, mask, prompt_len):
    v = value_model.values(params, value_config, tokens, mask)
    return v[:, prompt_len - 1:-1]

  def minibatch_loss(params, ro: Rollout, normalizer):
    prompt_len = ro.tokens.shape[1] - ro.response_mask.shape[1]
    logits = policy_logits(params['policy'], ro.tokens, ro.mask, prompt_len)
    values = response_values(params['value'], ro.tokens, ro.mask, prompt_len) if use_value else None
    return logits_loss(logits, values, ro, normalizer)

  def logits_loss(logits, values, ro: Rollout, normalizer):
    """The reduced loss of the rows of `ro` as a function of the policy's response logits `[b, N, V]`."""
    prompt_len = ro.tokens.shape[1] - ro.response_mask.shape[1]
    logp = picked(jax.nn.log_softmax(logits, -1), ro.tokens[:, prompt_len:], ro.response_mask)
    m = ro.response_mask.astype(jnp.float32)
    batch = PolicyBatch(logp=logp, mask=m, advantages=ro.advantages, old_logp=ro.old_logp, ref_logp=ro.ref_logp,
                        values=values, old_values=ro.old_values, returns=ro.returns, logits=logits,
                        ref_logits=ro.ref_logits)
    per_token, piece_metrics = objective.loss(batch)
    loss = objective.reduce(per_token, m, normalizer=normalizer)
    n_tok = jnp.maximum(m.sum(), 1.0)
    ratio = jnp.exp(jnp.where(ro.response_mask, logp - ro.old_logp, 0.0))
    aux = {'ratio_dev': jnp.max(jnp.abs(ratio - 1.0) * m),
           'approx_kl': (jnp.where(ro.response_mask, ro.old_logp - logp, 0.0)).sum() / n_tok}
    if 'clipped' in piece_metrics:
      aux['clip_fraction'] = (piece_metrics['clipped'] * m).sum() / n_tok
    return loss, aux

  def stats_of(logits, ref_params, tokens, mask, prompt_len, group=1):
    """`token_stats` given the policy's response logits `[b, N, V]`: the reference runs here (each
    prompt once per `group` consecutive rows)."""
    resp, rmask = tokens[:, prompt_len:], mask[:, prompt_len:]
    lp = jax.nn.log_softmax(logits, -1)
    ref_logits = policy_logits(ref_params, tokens, mask, prompt_len, group)
    ref = jax.nn.log_softmax(ref_logits, -1)
    p = jnp.exp(lp)
    return (picked(lp, resp, rmask), picked(ref, resp, rmask), -(p * lp).sum(-1), (p * (lp - ref)).sum(-1),
            ref_logits if need_ref_logits else None)

  def token_stats(policy_params, ref_params, tokens, mask, prompt_len):
    """Per response token `[B, N]`: log π_T, log π_ref,T, entropy and exact KL(π_T‖π_ref,T) of the
    next-token distributions, and the reference logits (when a loss needs them). Computed in
    chunks of one minibatch's rows, the shape the update recomputes log π_T at, so that the
    first minibatch's ratio is exactly the same computation."""
    def chunk(tok, msk):
      return stats_of(policy_logits(policy_params, tok, msk, prompt_len), ref_params, tok, msk, prompt_len)

    return by_rows(chunk, s.minibatches, tokens, mask)

  def row_chunks(tokens, group=1):
    """`Settings.row_chunks` resolved for a rollout `[B, L]`; 'auto' keeps groups of `group`
    consecutive rows in one block."""
    b, length = tokens.shape
    if s.row_chunks == accumulate.AUTO:
      return accumulate.auto_steps(b // group, group * policy_config.num_heads * length * length, ATTENTION_ELEMENTS)
    return s.row_chunks

  def score(scorer_fn, params, tokens, mask):
    """`scorer_fn(params, tokens, mask)` `[K, B]`, in `row_chunks` row blocks."""
    return by_rows(lambda t, m: scorer_fn(params, t, m).T, row_chunks(tokens), tokens, mask).T

  def draw(state: RLState, batch, key):
    """The sampled rollout: (tokens [B, Lp + N], mask [B, Lp + N], the sampler's output)."""
    rows = batch['prompt_tokens'].shape[0] * s.group_size
    for name in ('minibatches', 'row_chunks'):
      if getattr(s, name) != accumulate.AUTO and rows % getattr(s, name):
        raise ValueError(f'rl iteration: {rows} rollout rows (prompts × group_size) are not a multiple of '
                         f'{name}={getattr(s, name)}.')
    prompt_mask = batch['prompt_mask'].astype(bool)
    out = sampling.sample(state.params['policy'], policy_config, batch['prompt_tokens'], prompt_mask, key,
                          max_new_tokens=s.max_new_tokens, temperature=temp, top_k=s.top_k, top_p=s.top_p,
                          eos_id=s.eos_id, pad_id=s.pad_id, group_size=s.group_size)
    prompt_tokens = transformer.repeat_rows(batch['prompt_tokens'], s.group_size)
    prompt_mask = transformer.repeat_rows(prompt_mask, s.group_size)
    tokens = jnp.concatenate([prompt_tokens, out.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
    return tokens, mask, out

  def rollout(state: RLState, frozen: Frozen, batch, key):
    tokens, mask, out = draw(state, batch, key)
    stats = token_stats(state.params['policy'], frozen.ref_params, tokens, mask, batch['prompt_tokens'].shape[1])
    return finish(state, frozen, batch, tokens, mask, out, stats)

  def finish(state: RLState, frozen: Frozen, batch, tokens, mask, out, stats):
    """Scores, rewards, advantages and metrics of a drawn rollout with its `token_stats`."""
    prompt_len = batch['prompt_tokens'].shape[1]
    rmask, m = out.mask, out.mask.astype(jnp.float32)
    resp = out.tokens
    old_logp, ref_logp, entropy, kl_exact, ref_logits = stats
    scores = jax.eval_shape(scorer, frozen.reward_params, tokens, mask)
    if scores.ndim != 2 or scores.shape[1] != tokens.shape[0]:
      raise ValueError(f'rl iteration: the scorer must return [K, B] = (K, {tokens.shape[0]}) scores; '
                       f'got {scores.shape}.')
    scores = score(scorer, frozen.reward_params, tokens, mask)
    prompt_ids = batch.get('prompt_ids')
    ctx = RewardContext(stats=frozen.stats, logp=old_logp, ref_logp=ref_logp, mask=m, ref_samples=frozen.ref_samples,
                        prompt_ids=None if prompt_ids is None else jnp.repeat(prompt_ids, s.group_size))
    shaped, reward_state = objective.apply_reward(scores, state.reward_state, ctx)
    rewards, finished = place_rewards(shaped, resp, rmask, s.eos_id, s.missing_eos_penalty)
    values = response_values(state.params['value'], tokens, mask, prompt_len) if use_value else None
    if isinstance(objective.advantage, Transform):
      adv, advantage_state = objective.advantage.apply(rewards, m, state.advantage_state)
    else:
      adv, advantage_state = objective.advantage(rewards, m, values), state.advantage_state
    ro = Rollout(tokens=tokens, mask=mask, response_mask=rmask, old_logp=old_logp, ref_logp=ref_logp,
                 advantages=jax.lax.stop_gradient(adv.advantages), returns=jax.lax.stop_gradient(adv.returns),
                 old_values=values, ref_logits=ref_logits if need_ref_logits else None)
    logratio = jnp.where(rmask, old_logp - ref_logp, 0.0)
    lengths = m.sum(-1)
    proxy = objectives.normalize(scores, frozen.stats).mean(0)
    metrics = {
        'reward/raw': scores.mean(),
        'reward/proxy': proxy.mean(),
        'reward/transformed': rewards.sum(-1).mean(),
        'reward/member_spread': scores.std(0).mean(),
        'kl/k1': logratio.sum(-1).mean(),
        'kl/k3': (jnp.where(rmask, jnp.expm1(-logratio) + logratio, 0.0)).sum(-1).mean(),
        'kl/exact': (kl_exact * m).sum(-1).mean(),
        'entropy': (entropy * m).sum() / jnp.maximum(m.sum(), 1.0),
        'response_length': lengths.mean(),
        'eos_fraction': finished.astype(jnp.float32).mean(),
        'logp_mismatch': jnp.max(jnp.abs(out.policy_logprobs - old_logp) / jnp.maximum(jnp.abs(old_logp), 1.0)),
        'advantage_mean': (ro.advantages * m).sum() / jnp.maximum(m.sum(), 1.0),
    }
    if scores.shape[0] > 1:
      metrics.update({f'reward/member_{i}': scores[i].mean() for i in range(scores.shape[0])})
    for i, coef in enumerate(adaptive_kl_coefs(state.reward_state)):  # the β applied this iteration
      metrics[f'kl/coef_{i}' if i else 'kl/coef'] = coef
    gold = None
    if gold_scorer is not None:
      gold = score(gold_scorer, frozen.gold_params, tokens, mask).mean(0)
      metrics['reward/gold'] = gold.mean()
      metrics['reward/proxy_gold_spearman'] = rank_correlation(proxy, gold)
    return ro, reward_state, advantage_state, metrics, Samples(tokens, mask, scores, gold)

  def evaluate(state: RLState, frozen: Frozen, batch, key):
    """Rollout metrics and samples on (held-out) prompts, without an update or a state change."""
    _, _, _, metrics, samples = rollout(state, frozen, batch, key)
    return metrics, samples

  def normalizer_of(ro: Rollout):
    m = ro.response_mask.astype(jnp.float32)
    return objectives.batch_normalizer(m, objective.reduction) / s.minibatches

  def step(carry, loss_and_grads):
    (params, opt_state), ((loss, aux), grads) = carry, loss_and_grads
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))

  def iteration_samples(state: RLState, frozen: Frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    sample_key, shuffle_key = jax.random.split(key)
    if one_pass and s.epochs == s.minibatches == 1 and not use_value:
      return one_pass_iteration(state, frozen, batch, sample_key)
    ro, reward_state, advantage_state, metrics, samples = rollout(state, frozen, batch, sample_key)
    b = ro.tokens.shape[0]
    normalizer = normalizer_of(ro)
    grad_fn = jax.value_and_grad(minibatch_loss, has_aux=True)

    def update(carry, mb):
      return step(carry, grad_fn(carry[0], mb, normalizer))

    def epoch(carry, epoch_key):
      perm = jax.random.permutation(epoch_key, b)
      mbs = jax.tree.map(lambda x: x[perm].reshape(s.minibatches, b // s.minibatches, *x.shape[1:]), ro)
      return jax.lax.scan(update, carry, mbs)

    (params, opt_state), per_step = jax.lax.scan(epoch, (state.params, state.opt_state),
                                                 jax.random.split(shuffle_key, s.epochs))
    metrics.update({k: v.mean() for k, v in per_step.items() if k != 'ratio_dev'})
    metrics['ratio_dev_first'] = per_step['ratio_dev'][0, 0]
    return advanced(state, params, opt_state, reward_state, advantage_state), metrics, samples

  def one_pass_iteration(state: RLState, frozen: Frozen, batch, key):
    """One epoch of one minibatch with a single policy forward pass: its logits give the rollout's
    statistics, its pullback the update's gradient (see `one_pass`). The rows keep their order
    (one minibatch of all B rows: the loss does not depend on it). The forward passes run in
    `row_chunks` row blocks; each block's pullback (its residuals) is kept for the gradient."""
    tokens, mask, out = draw(state, batch, key)
    prompt_len = batch['prompt_tokens'].shape[1]
    chunks, policy = row_chunks(tokens, s.group_size), state.params['policy']
    group = s.group_size if tokens.shape[0] // chunks % s.group_size == 0 else 1  # blocks of whole groups

    def forward(tok, msk):
      logits, pullback = jax.vjp(lambda w: policy_logits(w, tok, msk, prompt_len, group), policy)
      return logits, pullback, stats_of(logits, frozen.ref_params, tok, msk, prompt_len, group)

    if chunks == 1:
      logits, pullback, stats = forward(tokens, mask)
    else:  # the pullbacks' residuals stay stacked per block; logits and stats are rejoined to [B, ...]
      blocks = lambda x: x.reshape(chunks, -1, *x.shape[1:])
      logits, pullback, stats = jax.lax.map(lambda a: forward(*a), (blocks(tokens), blocks(mask)))
      logits, stats = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), (logits, stats))
    ro, reward_state, advantage_state, metrics, samples = finish(state, frozen, batch, tokens, mask, out, stats)
    (loss, aux), logit_grads = jax.value_and_grad(logits_loss, has_aux=True)(logits, None, ro, normalizer_of(ro))
    if chunks == 1:
      grads = pullback(logit_grads)[0]
    else:
      grads = jax.lax.scan(lambda total, a: (jax.tree.map(jnp.add, total, a[0](a[1])[0]), None),
                           jax.tree.map(jnp.zeros_like, policy), (pullback, blocks(logit_grads)))[0]
    (params, opt_state), step_metrics = step((state.params, state.opt_state),
                                             ((loss, aux), {'policy': grads}))
    metrics.update({k: v for k, v in step_metrics.items() if k != 'ratio_dev'})
    metrics['ratio_dev_first'] = step_metrics['ratio_dev']
    return advanced(state, params, opt_state, reward_state, advantage_state), metrics, samples

  def advanced(state: RLState, params, opt_state, reward_state, advantage_state) -> RLState:
    return RLState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                   reward_state=reward_state, advantage_state=advantage_state)

  def iteration(state: RLState, frozen: Frozen, batch):
    new_state, metrics, _ = iteration_samples(state, frozen, batch)
    return new_state, metrics

  return Functions(iteration, evaluate, minibatch_loss, iteration_samples)


def make_iteration(policy_config: ModelConfig, objective_section: Any, settings: Settings, scorer: Scorer,
                   optimizer: optax.GradientTransformation, *, value_config: ModelConfig | None = None,
                   gold_scorer: Scorer | None = None, state_shardings: Any = None):
  """`jax.jit`-ed `iteration(state, frozen, batch) -> (state, metrics)` with `state` donated.

  One program: sampler scan, scoring, reward chain, advantages and the epochs × minibatches
  update scan (see the module docstring). metrics: scalars (reward, KL, entropy, lengths,
  clip fraction, loss, ...). `state_shardings` (an `RLState` of shardings) pins the output
  state's placement.
  """
  iteration = make_functions(policy_config, objective_section, settings, scorer, optimizer,
                             value_config=value_config, gold_scorer=gold_scorer).iteration
  out = (state_shardings, None) if state_shardings is not None else None
  return jax.jit(iteration, donate_argnums=(0,), out_shardings=out)
