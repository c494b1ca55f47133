"""Best-of-n sampling, its KL, and the unbiased best-of-n curve from one sampling pass.

Sampling (`best_of_n`): each prompt gets n responses, drawn in chunks of c (one `lax.scan` over
n / c chunks inside one jit, so the scorer's activations stay `[P·c, L]` however large n is);
each chunk is scored by `scorer` and reduced to one reward per response by `reward`, and a
running argmax keeps the best response per prompt. Chunk j draws with `fold_in(rng, j)` c
responses per prompt in consecutive rows (`sampling.sample(group_size=c)`: each prompt prefilled
once), so n = c = 1 is plain sampling with key `fold_in(rng, 0)`.

KL of best-of-n against the sampling policy π (one documented measurement, `../shared/PITFALLS.md` #11):

  kl_bound(n) = log n − (n − 1)/n      (Stiennon et al. 2020; used by Gao et al. 2022; an upper
                                        bound on the true KL, Beirami et al. 2024)
  plugin_kl(...)                       the KL of best-of-n of the *empirical* distribution of N
                                        draws: with the draws sorted by reward ascending, draw i gets
                                        p_i = (i/N)^n − ((i−1)/N)^n; identical responses are merged
                                        (their base mass c_j/N, their best-of-n mass Σ p_i), and
                                        KL = Σ_j P_j·log(P_j / (c_j/N)). With many duplicate short
                                        responses it is far below the bound.

Curves (`expected_best_of_n`): from N draws sorted by the optimized (proxy) reward ascending,
the expected score of the best of n ≤ N draws (without replacement, the mean over all n-subsets)
is the unbiased estimator of Gao et al. (2022)

  E[s_best-of-n] = Σ_{i=n..N} C(i−1, n−1) / C(N, n) · s_(i),

the weights computed in log space (`lgamma`), so N in the thousands stays finite; the same
weights serve the gold and the proxy score.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import objectives
from rmjax.models import sampling
from rmjax.models.config import ModelConfig
from rmjax.objectives import RewardContext

RewardFn = Callable[[jax.Array], jax.Array]
"""`reward(scores [K, B]) -> [B]`: an aggregation / transform chain applied to a scorer's output."""


class BestOfN(NamedTuple):
  """tokens, mask [P, N_new]: the best response per prompt; reward [P]: its reward;
  rewards [P, n]: every draw's reward; samples, sample_mask [P, n, N_new] (if kept);
  gold [P, n]: every draw's gold score (if a gold scorer is given)."""
  tokens: jax.Array
  mask: jax.Array
  reward: jax.Array
  rewards: jax.Array
  samples: jax.Array | None
  sample_mask: jax.Array | None
  gold: jax.Array | None


def kl_bound(n: int | np.ndarray) -> np.ndarray:
  """log n − (n − 1)/n, the analytic best-of-n KL (an upper bound)."""
  n = np.asarray(n, np.float64)
  if np.any(n < 1):
    raise ValueError(f'kl_bound: n must be >= 1, got {n}.')
  return np.log(n) - (n - 1) / n


def distinct_ids(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """`[N]` int ids, equal exactly for identical responses (tokens where mask, `[N, T]`)."""
  rows = np.where(np.asarray(mask, bool), np.asarray(tokens), -1)
  return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def plugin_kl(rewards: np.ndarray, ids: np.ndarray, n: int) -> float:
  """Plug-in KL of best-of-n over the empirical distribution of N draws (module docstring).

  rewards [N]: the optimized reward of each draw; ids [N]: equal for identical responses (they
  have equal rewards); n >= 1. Ties between different responses are ordered by index.
  """
  rewards, ids = np.asarray(rewards, np.float64), np.asarray(ids)
  if rewards.ndim != 1 or ids.shape != rewards.shape:
    raise ValueError(f'plugin_kl: rewards and ids must be [N] alike; got {rewards.shape} and {ids.shape}.')
  if n < 1:
    raise ValueError(f'plugin_kl: n must be >= 1, got {n}.')
  big_n = rewards.shape[0]
  order = np.argsort(rewards, kind='stable')
  i = np.arange(1, big_n + 1, dtype=np.float64)
  p = np.empty(big_n)
  p[order] = (i / big_n) ** n - ((i - 1) / big_n) ** n
  _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  mass = np.bincount(inverse.reshape(-1), weights=p)
  base = counts / big_n
  keep = mass > 0
  return float(np.sum(mass[keep] * np.log(mass[keep] / base[keep])))


def best_of_n_weights(big_n: int, n: int) -> np.ndarray:
  """`[N]` weights w_i = C(i−1, n−1) / C(N, n) on the ascending order (0 for i < n), in log space."""
  if not 1 <= n <= big_n:
    raise ValueError(f'best_of_n_weights: need 1 <= n <= N; got n={n}, N={big_n}.')
  lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
  w = np.zeros(big_n)
  total = lc(big_n, n)
  for i in range(n, big_n + 1):
    w[i - 1] = math.exp(lc(i - 1, n - 1) - total)
  return w


def expected_best_of_n(proxy: np.ndarray, scores: np.ndarray, ns: Sequence[int]) -> np.ndarray:
  """Unbiased E[score of the best-of-n by `proxy`] for each n in `ns` (Gao et al. 2022).

  proxy [..., N]: the optimized reward of N draws per prompt; scores [..., N]: the score to
  report (gold, or the proxy itself) of the same draws. Returns [..., len(ns)]; average over
  prompts afterwards. Ties in `proxy` are ordered by index.
  """
  proxy, scores = np.asarray(proxy, np.float64), np.asarray(scores, np.float64)
  if proxy.shape != scores.shape:
    raise ValueError(f'expected_best_of_n: proxy {proxy.shape} and scores {scores.shape} must match.')
  order = np.argsort(proxy, axis=-1, kind='stable')
  s_sorted = np.take_along_axis(scores, order, axis=-1)
  big_n = proxy.shape[-1]
  weights = np.stack([best_of_n_weights(big_n, int(n)) for n in ns], axis=-1)  # [N, len(ns)]
  return s_sorted @ weights


def best_of_n(policy_params: Any, policy_config: ModelConfig, scorer: Callable, reward_params: Any,
              reward: RewardFn, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *, n: int,
              chunk: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              eos_id: int | None = None, pad_id: int = 0, keep_samples: bool = True,
              gold_scorer: Callable | None = None, gold_params: Any = None) -> BestOfN:
  """Best of n responses per prompt under `reward(scorer(reward_params, tokens, mask))`.

  prompt_tokens, prompt_mask [P, Lp] (left-padded); n a multiple of chunk (static); the
  scorer sees prompt + response `[P·chunk, Lp + N_new]`. Ties keep the earliest draw. Memory:
  one chunk's activations plus `[P, n]` rewards (and `[P, n, N_new]` tokens if keep_samples).
  """
  for name, v in (('n', n), ('chunk', chunk)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f'best_of_n: {name}={v!r} must be a positive int.')
  if n % chunk:
    raise ValueError(f'best_of_n: n={n} must be a multiple of chunk={chunk}.')
  if (gold_scorer is None) != (gold_params is None):
    raise ValueError('best_of_n: give gold_scorer and gold_params together.')
  return _best_of_n(policy_params, reward_params, gold_params, prompt_tokens, prompt_mask.astype(bool), rng,
                    policy_config=policy_config, scorer=scorer, reward=reward, gold_scorer=gold_scorer, n=n,
                    chunk=chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, pad_id=pad_id, keep_samples=keep_samples)


def _best_of_n_impl(policy_params, reward_params, gold_params, prompt_tokens, prompt_mask, rng, *, policy_config,
                    scorer, reward, gold_scorer, n, chunk, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                    keep_samples):
  p, lp = prompt_tokens.shape
  rows_t, rows_m = jnp.repeat(prompt_tokens, chunk, axis=0), jnp.repeat(prompt_mask, chunk, axis=0)

  def draw(carry, j):
    best_t, best_m, best_r = carry
    out = sampling.sample(policy_params, policy_config, prompt_tokens, prompt_mask, jax.random.fold_in(rng, j),
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=eos_id, pad_id=pad_id, group_size=chunk)
    tokens = jnp.concatenate([rows_t, out.tokens], 1)
    mask = jnp.concatenate([rows_m, out.mask], 1)
    r = reward(scorer(reward_params, tokens, mask)).reshape(p, chunk)
    resp_t, resp_m = out.tokens.reshape(p, chunk, -1), out.mask.reshape(p, chunk, -1)
    i = jnp.argmax(r, axis=1)
    r_i = jnp.take_along_axis(r, i[:, None], 1)[:, 0]
    better = r_i > best_r
    pick = lambda x: jnp.take_along_axis(x, i[:, None, None], 1)[:, 0]
    best_t = jnp.where(better[:, None], pick(resp_t), best_t)
    best_m = jnp.where(better[:, None], pick(resp_m), best_m)
    best_r = jnp.where(better, r_i, best_r)
    extra = (resp_t, resp_m) if keep_samples else (None, None)
    gold = gold_scorer(gold_params, tokens, mask).mean(0).reshape(p, chunk) if gold_scorer is not None else None
    return (best_t, best_m, best_r), (r, gold) + extra

  init = (jnp.full((p, max_new_tokens), pad_id, jnp.int32), jnp.zeros((p, max_new_tokens), bool),
          jnp.full((p,), -jnp.inf, jnp.float32))
  (best_t, best_m, best_r), (rs, gold, st, sm) = jax.lax.scan(draw, init, jnp.arange(n // chunk))
  # [n/c, P, c, ...] -> [P, n, ...] in draw order (chunk-major).
  flat = lambda x: None if x is None else jnp.moveaxis(x, 0, 1).reshape(p, n, *x.shape[3:])
  return BestOfN(best_t, best_m, best_r, flat(rs), flat(st), flat(sm), flat(gold))


_best_of_n = jax.jit(_best_of_n_impl, static_argnames=(
    'policy_config', 'scorer', 'reward', 'gold_scorer', 'n', 'chunk', 'max_new_tokens', 'temperature', 'top_k',
    'top_p', 'eos_id', 'pad_id', 'keep_samples'))


def objective_reward(objective_section: Any, stats: Any = None) -> RewardFn:
  """`reward(scores [K, B]) -> [B]` from a config's reward chain (`config.objective.reward`, e.g.
  'uwo' or 'mean,log_sigmoid'), applied with its initial state and the members' `stats`.

  Build it once and reuse it: `best_of_n` compiles once per reward function.
  """
  objective = objectives.build(objective_section)
  if objective.reward is None:
    raise ValueError("objective_reward: config.objective.reward is empty; select an aggregation, e.g. 'mean'.")

  def reward(scores: jax.Array) -> jax.Array:
    out, _ = objective.apply_reward(scores, objective.init_reward_state(), RewardContext(stats=stats))
    if out.shape != scores.shape[1:]:
      raise ValueError(f'objective_reward: the reward chain returned shape {out.shape}, not [B] = '
                       f'{scores.shape[1:]}; best-of-n takes one reward per response (no per-token terms).')
    return out

  return reward
