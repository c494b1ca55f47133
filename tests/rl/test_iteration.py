"""The RL iteration: learning a toy reward, ratio = 1, reward positions, one program, split invariance."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmjax import objectives
from rmjax.models import sampling
from rmjax.models.reward_model import RewardModel
from rmjax.rl import iteration as it
from tests.rl.conftest import EOS, PAD, TINY, count_scorer, left_padded_prompts

GROUP = 4
# Sampling at T = 0.7 with top-k: the trainer's log-probs must still match the sampler's.
SETTINGS = it.Settings(group_size=GROUP, max_new_tokens=8, temperature=0.7, top_k=16, eos_id=EOS, pad_id=PAD,
                       epochs=2, minibatches=4)
SECTIONS = {
    'ppo': dict(reward='mean,kl_penalty', kl_penalty=dict(beta=0.01), advantage='gae', loss='ppo_clip,value'),
    'rloo': dict(reward='mean', advantage='rloo', rloo=dict(group_size=GROUP), loss='ppo_clip,kl_k2',
                 kl_k2=dict(coef=0.01)),
    'grpo': dict(reward='mean', advantage='grpo', grpo=dict(group_size=GROUP), loss='ppo_clip,kl_k3',
                 kl_k3=dict(coef=0.01), reduction='seq_mean_token_mean'),
    'dr_grpo': dict(reward='mean', advantage='dr_grpo', dr_grpo=dict(group_size=GROUP), loss='ppo_clip',
                    reduction='constant', reduction_constant=8.0),
}
ITERATIONS = 25


def _start(policy_params, section, optimizer, value=False):
  params = it.init_params(jax.random.key(1), policy_params, TINY if value else None)
  state = it.init_state(params, optimizer, jax.random.key(2), objectives.build(section))
  return state, it.Frozen(ref_params=policy_params, reward_params=None)


@pytest.fixture(scope='module')
def runs(policy_params):
  """Per algorithm: the jitted iteration and the metrics of ITERATIONS iterations (one compile each)."""
  cache = {}

  def get(name):
    if name not in cache:
      section = SECTIONS[name]
      optimizer = optax.adam(1e-2)
      value = name == 'ppo'
      fn = it.make_iteration(TINY, section, SETTINGS, count_scorer, optimizer, value_config=TINY if value else None)
      state, frozen = _start(policy_params, section, optimizer, value)
      batch = left_padded_prompts()
      history = []
      for _ in range(ITERATIONS):
        state, m = fn(state, frozen, batch)
        history.append(jax.device_get(m))
      cache[name] = (fn, history)
    return cache[name]

  return get


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_each_algorithm_increases_the_toy_reward(runs, name):
  fn, history = runs(name)
  reward = np.array([m['reward/raw'] for m in history])
  # The base policy emits TARGET with probability ~1/32 per token (about 0.3 of 8 tokens);
  # every algorithm must make it the dominant token within 25 iterations.
  assert reward[0] < 1.0
  assert reward[-5:].mean() > 4.0, reward
  assert all(np.isfinite(m['loss']) for m in history)
  # The iteration compiled once for all 25 calls.
  assert fn._cache_size() == 1


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_ratio_is_one_on_first_minibatch_at_t07_with_top_k(runs, name):
  _, history = runs(name)
  for m in history:
    # Sampler (KV cache) vs trainer (no cache) log-probs of log_softmax(logits / 0.7) agree to
    # float32 rounding (two different programs: cached decode vs one pass; the logit error grows
    # with |logits|, large once the toy policy collapses): |Δ| <= 1e-5 · max(|log p|, 1).
    assert m['logp_mismatch'] <= 1e-5
    # Hence the PPO ratio on the first minibatch of the first epoch is 1 within 1e-6.
    assert m['ratio_dev_first'] <= 1e-6
  # Later minibatches did move the policy (the check above is not vacuous).
  assert max(m['approx_kl'] for m in history) > 1e-4


def test_adaptive_kl_controller_reaches_and_holds_target(policy_params):
  section = dict(reward='mean,adaptive_kl', adaptive_kl=dict(target=2.0, init_coef=0.5, rate=1.0),
                 advantage='gae', loss='ppo_clip,value')
  optimizer = optax.adam(3e-3)
  fn = it.make_iteration(TINY, section, SETTINGS, count_scorer, optimizer, value_config=TINY)
  state, frozen = _start(policy_params, section, optimizer, value=True)
  batch = left_padded_prompts()
  kl, coef = [], []
  for _ in range(70):
    state, m = fn(state, frozen, batch)
    kl.append(float(m['kl/k1']))
    coef.append(float(m['kl/coef']))
  # The controller's β lives in the state: the last β applied, updated by that iteration's KL.
  beta = state.reward_state[1].coef
  assert float(beta) == pytest.approx(coef[-1] * (1 + 1.0 * np.clip(kl[-1] / 2.0 - 1, -0.2, 0.2)), rel=1e-5)
  # From iteration 30 on, every 5-iteration mean of the sequence KL is within ±30% of the target.
  windows = np.array(kl[30:]).reshape(-1, 5).mean(1)
  assert np.all(np.abs(windows / 2.0 - 1.0) <= 0.3), windows


def test_place_rewards_eos_truncated_and_penalty():
  # Rows: EOS at 2 then padding; truncated (no EOS, full); EOS as the very first token.
  tokens = jnp.array([[5, 6, EOS, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  seq = jnp.array([1.0, 2.0, 3.0])
  rewards, finished = it.place_rewards(seq, tokens, mask, EOS, None)
  np.testing.assert_array_equal(np.asarray(rewards), [[0, 0, 1, 0], [0, 0, 0, 2], [3, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(finished), [True, False, True])
  penalized, _ = it.place_rewards(seq, tokens, mask, EOS, 10.0)
  np.testing.assert_array_equal(np.asarray(penalized), [[0, 0, 1, 0], [0, 0, 0, -8], [3, 0, 0, 0]])
  # Token rewards [B, N] from the chain are kept on real tokens and zeroed on padding.
  tok, _ = it.place_rewards(jnp.ones((3, 4)), tokens, mask, EOS, None)
  np.testing.assert_array_equal(np.asarray(tok), np.asarray(mask, np.float32))
  with pytest.raises(ValueError, match='aggregation'):
    it.place_rewards(jnp.ones((2, 3)), tokens, mask, EOS, None)


def test_reward_model_reads_eos_of_left_padded_prompt_plus_response():
  """The rollout's layout (left-padded prompt + right-padded response) scores like the bare row."""
  rm = RewardModel(TINY, num_members=2)
  params = rm.init(jax.random.key(3))
  score = jax.jit(rm.apply)
  prompt = jnp.array([[PAD, PAD, 4, 5], [9, 10, 11, 12]])
  prompt_mask = prompt != PAD
  response = jnp.array([[6, EOS, PAD], [13, 14, 15]])   # EOS-terminated; truncated
  response_mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  scores = score(params, jnp.concatenate([prompt, response], 1), jnp.concatenate([prompt_mask, response_mask], 1))
  bare = [jnp.array([[4, 5, 6, EOS]]), jnp.array([[9, 10, 11, 12, 13, 14, 15]])]
  for i, row in enumerate(bare):
    want = score(params, row, jnp.ones_like(row, bool))[:, 0]
    np.testing.assert_allclose(np.asarray(scores[:, i]), np.asarray(want), atol=1e-5)


def _count_eqns(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_eqns(sub)
  return n


def _primitives(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _primitives(sub, out)
  return out


def test_iteration_is_one_program_without_python_loops(policy_params):
  section = SECTIONS['rloo']
  sizes = {}
  for tokens, minibatches in ((4, 2), (8, 2), (8, 4)):
    settings = it.Settings(group_size=GROUP, max_new_tokens=tokens, temperature=0.7, top_k=16, eos_id=EOS,
                           minibatches=minibatches, epochs=2)
    optimizer = optax.adam(1e-2)
    fn = it.make_functions(TINY, section, settings, count_scorer, optimizer).iteration
    state, frozen = _start(policy_params, section, optimizer)
    jaxpr = jax.make_jaxpr(fn)(state, frozen, left_padded_prompts()).jaxpr
    sizes[tokens, minibatches] = _count_eqns(jaxpr)
  # The program does not grow with the number of tokens or of minibatches.
  assert sizes[4, 2] == sizes[8, 2] == sizes[8, 4], sizes
  prims = _primitives(jaxpr, [])
  # Decode loop, epoch scan and minibatch scan (and GAE-free reverse scans) are all lax.scan.
  assert prims.count('scan') >= 3


@pytest.mark.parametrize('reduction', ['token_mean', 'seq_mean_token_mean'])
def test_same_gradient_for_one_or_four_minibatches(policy_params, reduction):
  section = dict(SECTIONS['grpo'], reduction=reduction)
  settings = it.Settings(group_size=GROUP, max_new_tokens=6, temperature=0.7, eos_id=EOS)
  loss_fn = it.make_functions(TINY, section, settings, count_scorer, optax.sgd(0.1)).minibatch_loss
  rng = np.random.default_rng(0)
  b, lp, n = 16, 4, 6
  tokens = jnp.asarray(rng.integers(2, 32, (b, lp + n)), jnp.int32)
  lengths = rng.integers(1, n + 1, b)
  rmask = jnp.asarray(np.arange(n)[None] < lengths[:, None])
  mask = jnp.concatenate([jnp.ones((b, lp), bool), rmask], 1)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  ro = it.Rollout(tokens=tokens, mask=mask, response_mask=rmask, old_logp=f(b, n) - 3, ref_logp=f(b, n) - 3,
                  advantages=f(b, n), returns=f(b, n), old_values=None, ref_logits=None)
  params = {'policy': policy_params}
  norm = objectives.batch_normalizer(rmask.astype(jnp.float32), reduction)
  grad = jax.jit(jax.grad(lambda p, r: loss_fn(p, r, norm)[0]))
  full = grad(params, ro)
  parts = [grad(params, jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], ro)) for i in range(4)]
  summed = jax.tree.map(lambda *g: sum(g), *parts)
  # fp32 sums of four parts vs one: within 1e-6 absolute on gradients of size ~1e-2.
  for a, c in zip(jax.tree.leaves(full), jax.tree.leaves(summed)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6, rtol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full)) > 1e-4


def test_bad_settings_and_objectives_raise():
  with pytest.raises(ValueError, match='temperature'):
    it.Settings(temperature=0.0)
  with pytest.raises(ValueError, match='eos_id'):
    it.Settings(missing_eos_penalty=1.0)
  with pytest.raises(ValueError, match="'value' loss"):
    it.make_functions(TINY, dict(reward='mean', advantage='gae', loss='ppo_clip'), it.Settings(), count_scorer,
                      optax.sgd(1.0), value_config=TINY)
  with pytest.raises(ValueError, match='value_config'):
    it.make_functions(TINY, dict(reward='mean', advantage='gae', loss='ppo_clip,value'), it.Settings(),
                      count_scorer, optax.sgd(1.0))


def test_log_sigmoid_reads_the_per_prompt_reference_rewards_of_frozen(policy_params):
  # log σ(r − r_ref(x)) with r_ref(x) the median of Frozen.ref_samples[prompt id], by hand from the
  # rollout's scores: the reference rewards reach the transform through the iteration.
  section = dict(reward='mean,log_sigmoid', log_sigmoid=dict(ref='quantile', q=0.5), advantage='rloo',
                 rloo=dict(group_size=GROUP), loss='ppo_clip')
  optimizer = optax.sgd(0.0)
  fns = it.make_functions(TINY, section, SETTINGS, count_scorer, optimizer)
  state, frozen = _start(policy_params, section, optimizer)
  ref_samples = np.random.default_rng(0).normal(2.0, 1.0, size=(12, 5)).astype(np.float32)
  batch = dict(left_padded_prompts(), prompt_ids=jnp.arange(3, 11, dtype=jnp.int32))
  metrics, samples = jax.jit(fns.evaluate)(state, frozen._replace(ref_samples=jnp.asarray(ref_samples)), batch,
                                           jax.random.key(5))
  r = np.asarray(samples.scores[0], np.float64)
  r_ref = np.median(ref_samples[np.repeat(np.arange(3, 11), GROUP)], axis=-1)
  want = np.mean(-np.logaddexp(0.0, r_ref - r))  # −softplus(r_ref − r), summed over a response's tokens
  np.testing.assert_allclose(float(metrics['reward/transformed']), want, rtol=1e-5, atol=1e-6)


def test_one_pass_update_equals_the_two_pass_update(policy_params):
  """With one epoch of one minibatch the update's forward pass also gives the rollout's
  log-probs (`one_pass`): against the separate pass, on an objective whose reward reads log π
  (a KL penalty) and whose loss reads the reference logits (exact KL), two iterations give the
  same tokens, metrics (1e-5) and parameters (the two updates differ by < 1e-5 of their size,
  each entry by < 1e-6; plain SGD, so no division by small second moments); the ratio is
  exactly 1; and the program has one policy forward pass fewer. The one-pass update in two row
  blocks (`row_chunks=2`: the pullbacks kept per block) is held to the same bounds, its ratio
  within 1e-6 (log_softmax over a block's shape rounds differently)."""
  section = dict(reward='mean,kl_penalty', kl_penalty=dict(beta=0.05), advantage='grpo', grpo=dict(group_size=GROUP),
                 loss='ppo_clip,kl_exact', kl_exact=dict(coef=0.01), reduction='seq_mean_token_mean')
  settings = dict(group_size=GROUP, max_new_tokens=6, temperature=0.7, top_k=16, eos_id=EOS, pad_id=PAD)
  optimizer = optax.sgd(0.5)
  batch = left_padded_prompts()
  # A reference away from the policy: at π = π_ref the KL penalty would be rounding noise, which
  # GRPO's per-group standardisation blows up where a group's counts are equal.
  leaves, tree = jax.tree.flatten(policy_params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  ref_params = tree.unflatten([x + 0.3 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  runs, programs = {}, {}
  for name, one_pass, chunks in (('fused', True, 1), ('chunked', True, 2), ('plain', False, 1)):
    fns = it.make_functions(TINY, section, it.Settings(**settings, row_chunks=chunks), count_scorer, optimizer,
                            one_pass=one_pass)
    state, frozen = _start(policy_params, section, optimizer)
    frozen = frozen._replace(ref_params=ref_params)
    programs[name] = jax.make_jaxpr(fns.iteration)(state, frozen, batch).jaxpr
    step = jax.jit(fns.iteration_samples)
    history = []
    for _ in range(2):
      state, metrics, samples = step(state, frozen, batch)
      history.append((jax.device_get(metrics), np.asarray(samples.tokens)))
    runs[name] = state, history
  (plain, plain_history) = runs['plain']
  for (m1, t1), (m2, t2) in zip(runs['fused'][1] + runs['chunked'][1], plain_history * 2):
    np.testing.assert_array_equal(t1, t2)
    assert sorted(m1) == sorted(m2)
    for k in m1:
      np.testing.assert_allclose(m1[k], m2[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert abs(m1['ratio_dev_first']) <= 1e-6 and abs(m1['approx_kl']) <= 1e-6
    assert m1['logp_mismatch'] <= 1e-5  # PITFALLS #7 on this path: sampler vs trainer at T = 0.7, top-k
  assert all(m['ratio_dev_first'] == 0.0 and m['approx_kl'] == 0.0 for m, _ in runs['fused'][1])
  moved = [np.asarray(a - b) for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(policy_params))]
  norm = lambda xs: np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in xs))
  for name in ('fused', 'chunked'):
    gap = [np.asarray(a - b) for a, b in zip(jax.tree.leaves(runs[name][0].params), jax.tree.leaves(plain.params))]
    assert norm(moved) > 1e-2 and norm(gap) < 1e-5 * norm(moved), name  # measured: 1.7e-6 of the update
    assert max(np.abs(x).max() for x in gap) < 1e-6, name
  # Every dot of each program accounted for: the sampler's, then plain: the policy's and the
  # reference's forward passes and the update's forward and backward; fused: the policy's forward
  # and backward (each prompt once per group) and the reference's forward (the same).
  prompt_len = batch['prompt_tokens'].shape[1]
  tokens = jnp.zeros((8 * GROUP, prompt_len + 6), jnp.int32)
  dots = lambda fn: _primitives(jax.make_jaxpr(fn)(policy_params).jaxpr, []).count('dot_general')
  sampler = dots(lambda p: sampling.sample(p, TINY, batch['prompt_tokens'], batch['prompt_mask'], jax.random.key(0),
                                           max_new_tokens=6, temperature=0.7, top_k=16, eos_id=EOS, pad_id=PAD,
                                           group_size=GROUP))
  forward = {k: (lambda p, k=k: it.response_logits(p, TINY, tokens, tokens > 0, prompt_len, 0.7, k))
             for k in (1, GROUP)}
  both = {k: dots(lambda p, f=f: (lambda out, pullback: pullback(out))(*jax.vjp(f, p))) for k, f in forward.items()}
  forward = {k: dots(f) for k, f in forward.items()}
  assert forward[GROUP] > forward[1] > 0  # the shared prompt's prefill and the responses' pass
  count = lambda name: _primitives(programs[name], []).count('dot_general')
  assert count('plain') == sampler + 2 * forward[1] + both[1]
  assert count('fused') == sampler + forward[GROUP] + both[GROUP]
