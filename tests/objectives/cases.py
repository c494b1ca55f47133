"""Fixed small inputs and one call per registered piece, shared by the registry-wide tests.

Each case gives the piece's required options (`base`), for *every* option a value that differs
from the base and must change the output (`alt`), and how to call the built piece on the inputs
`X` (a pytree, so that the same call can run under `jax.jit`).
"""
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

import rmjax.objectives as obj


class Case(NamedTuple):
  base: dict[str, Any]
  alt: dict[str, Any]
  call: Callable[[Any, dict[str, Any]], Any]


def _mask(lengths, t):
  return (jnp.arange(t)[None, :] < jnp.array(lengths)[:, None]).astype(jnp.float32)


def _ramp(shape, lo, hi):
  n = 1
  for s in shape:
    n *= s
  # a fixed, irregular fill: a permuted ramp
  v = jnp.linspace(lo, hi, n)
  return v[(jnp.arange(n) * 7) % n].reshape(shape)


X = dict(
    rc=jnp.array([1.5, -0.5, 2.0, 0.3]),
    rr=jnp.array([0.5, 0.2, -1.0, 0.3]),
    pred=_ramp((4, 2), -1.0, 2.0),
    target=_ramp((4, 2), 0.5, -0.5),
    amask=jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    rc2=_ramp((4, 2), -1.0, 1.5),
    rr2=_ramp((4, 2), 1.0, -0.5),
    scores=_ramp((3, 4), -2.0, 3.0),
    stats=obj.RewardStats(jnp.array([0.5, -0.5, 1.0]), jnp.array([1.0, 2.0, 0.5])),
    reward=jnp.array([1.8, -0.4, 0.6, 2.5]),
    rewards_m=_ramp((2, 4), -1.0, 2.0),
    components=jnp.array([[2.5, 1.5, 2.0, 2.0], [-0.5, 0.5, 0.0, 0.2]]),
    ref_reward=jnp.array([0.5, 0.5, -0.2, -0.2]),
    ref_reward_m=_ramp((2, 4), 0.0, 1.0),
    ref_samples=_ramp((2, 5), -1.0, 1.5),
    ref_samples_m=_ramp((2, 2, 5), -1.0, 1.0),
    prompt_ids=jnp.array([0, 0, 1, 1], jnp.int32),
    logp=_ramp((4, 3), -2.5, -0.1),
    ref_logp=_ramp((4, 3), -0.2, -3.0),
    old_logp=_ramp((4, 3), -1.0, -1.5),
    mask=_mask([3, 2, 1, 3], 3),
    # with the ratios exp(logp − old_logp) these hit every branch of ppo_clip (and its dual clip)
    advantages=jnp.array([[-1.0, 0.5, 0.3], [-0.8, 0.7, 0.2], [0.4, -0.3, 0.9], [0.6, -1.2, 1.1]]),
    values=_ramp((4, 3), -1.0, 1.0),
    old_values=_ramp((4, 3), 1.0, -0.5),
    returns=_ramp((4, 3), 0.5, 1.5),
    logits=_ramp((4, 3, 5), -2.0, 2.0),
    ref_logits=_ramp((4, 3, 5), 1.0, -1.5),
    tok_rewards=_ramp((4, 3), -0.5, 1.0),
    logp_r=_ramp((4, 2), -3.0, -0.5),
    ref_logp_r=_ramp((4, 2), -1.0, -2.0),
    mask_r=_mask([2, 1, 2, 2], 2),
)


def ctx(x):
  return obj.RewardContext(stats=x['stats'], ref_reward=x['ref_reward'], ref_samples=x['ref_samples'],
                           prompt_ids=x['prompt_ids'], logp=x['logp'], ref_logp=x['ref_logp'],
                           mask=x['mask'])


def batch(x):
  return obj.PolicyBatch(logp=x['logp'], mask=x['mask'], advantages=x['advantages'],
                         old_logp=x['old_logp'], ref_logp=x['ref_logp'], values=x['values'],
                         old_values=x['old_values'], returns=x['returns'], logits=x['logits'],
                         ref_logits=x['ref_logits'])


def _pair(piece, x):
  return piece(x['rc'], x['rr'])


def _agg(piece, x):
  return piece(x['scores'], x['stats'])


def _reward(piece, x):
  return piece(x['reward'], ctx(x))


def _tokens(piece, x):
  return piece(x['tok_rewards'], ctx(x))


def _stateful(reward_key):
  def call(t, x):
    out, state = t.apply(x[reward_key], t.init(), ctx(x))
    return out, t.apply(x[reward_key], state, ctx(x))
  return call


def _combine(piece, x):
  c = ctx(x)._replace(ref_reward=x['ref_reward_m'], ref_samples=x['ref_samples_m'])
  return piece(x['rewards_m'], c)


def _advantage(piece, x):
  return piece(x['tok_rewards'], x['mask'], x['values'])


def _reinforce(t, x):
  out, state = t.apply(x['tok_rewards'], x['mask'], t.init())
  return out, t.apply(x['tok_rewards'] * 2.0, x['mask'], state)


def _policy(piece, x):
  return piece(batch(x))


def _preference(piece, x):
  return piece(x['logp'], x['logp_r'], x['ref_logp'], x['ref_logp_r'], x['mask'], x['mask_r'])


BT = dict(margin=0.5, label_smoothing=0.1)
COEF = (dict(coef=0.1), dict(coef=0.5))

CASES: dict[str, Case] = {
    'bradley_terry': Case({}, BT, _pair),
    'bt_centered': Case({}, dict(eta=0.1, **BT), _pair),
    'regression': Case({}, dict(weights=jnp.array([2.0, 1.0])),
                       lambda p, x: p(x['pred'], x['target'], x['amask'])),
    'multi_objective': Case(dict(weights=jnp.array([0.5, 0.5])),
                            dict(weights=jnp.array([0.9, 0.1]), **BT),
                            lambda p, x: p(x['rc2'], x['rr2'], x['amask'])),
    'mean': Case({}, {}, _agg),
    'median': Case({}, {}, _agg),
    'min': Case({}, {}, _agg),
    'uwo': Case(dict(lam=0.5), dict(lam=1.0, unbiased=True), _agg),
    'mean_minus_std': Case({}, dict(k=2.0, unbiased=True), _agg),
    'quantile': Case(dict(q=0.25), dict(q=0.75), _agg),
    'softmin': Case(dict(beta=1.0), dict(beta=0.2), _agg),
    'log_sigmoid': Case({}, dict(ref='given', q=0.9), _reward),
    'par': Case({}, dict(ref='given', q=0.9), _reward),
    'clip': Case(dict(low=-0.3), dict(low=0.0, high=1.0), _reward),
    'length_penalty': Case(dict(coef=0.1), dict(coef=0.3, target=2.0), _reward),
    'combine': Case(dict(weights=jnp.array([0.6, 0.4])),
                    dict(weights=jnp.array([0.2, 0.8]), transform='par', ref='given', q=0.9), _combine),
    'whiten': Case({}, dict(eps=10.0, shift_mean=False), _stateful('reward')),
    'lagrangian': Case(dict(thresholds=jnp.array([0.5, -0.2]), lr=1.0),
                       dict(thresholds=jnp.array([0.0, 0.0]), lr=0.5, init_multiplier=2.0,
                            constraint='eq'),
                       _stateful('components')),
    'kl_penalty': Case(dict(beta=0.1), dict(beta=0.5), _reward),
    'adaptive_kl': Case(dict(target=0.5), dict(target=0.1, init_coef=0.3, rate=0.5, clip_error=0.05),
                        _stateful('reward')),
    'chi2': Case(dict(coef=0.1), dict(coef=0.5, max_ratio=1.5, min_chi2=10.0), _tokens),
    'gae': Case({}, dict(gamma=0.5, lam=0.5), _advantage),
    'rloo': Case(dict(group_size=2), dict(group_size=4), _advantage),
    'grpo': Case(dict(group_size=2), dict(group_size=4, eps=1.0, unbiased=True), _advantage),
    'dr_grpo': Case(dict(group_size=2), dict(group_size=4), _advantage),
    'reinforce': Case({}, dict(decay=0.5), _reinforce),
    'ppo_clip': Case({}, dict(eps=0.5, dual_clip=1.5), _policy),
    'pg': Case({}, {}, _policy),
    'value': Case({}, dict(clip=0.1, coef=2.0), _policy),
    'kl_k1': Case(*COEF, _policy),
    'kl_k2': Case(*COEF, _policy),
    'kl_k3': Case(*COEF, _policy),
    'kl_exact': Case(*COEF, _policy),
    'chi2_token': Case(*COEF, _policy),
    'entropy': Case(*COEF, _policy),
    'dpo': Case({}, dict(beta=0.5, label_smoothing=0.2), _preference),
    'ipo': Case({}, dict(tau=0.5, average=True), _preference),
}


def own_entries() -> list[obj.registry.Entry]:
  """The package's registered pieces without aliases (examples registered by tests excluded)."""
  return [e for e in obj.entries()
          if e.alias_of is None and e.factory.__module__.startswith('rmjax.objectives')]
