"""Populations: P members in one vmapped program equal P separate runs, member by member."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmjax import config as config_lib
from rmjax import objectives
from rmjax.rl import iteration as it
from rmjax.rl import population as pop
from rmjax.rl import trainer
from rmjax.train import checkpoint, optim, read_metrics
from tests.rl.conftest import EOS, PAD, TARGET, TINY, count_scorer, left_padded_prompts
from tests.rl.test_trainer import _config

# SGD in these comparisons: Adam's step g/(|g| + eps) turns float rounding in near-zero gradients
# (the batched and the single program sum in other orders) into steps of up to lr on those
# parameters (measured: 3e-3 with eps = 1e-8, 1e-5 with eps = 1e-4), which says nothing about
# whether the population computes each member's run; SGD passes rounding through at its size.
SETTINGS = it.Settings(group_size=2, max_new_tokens=6, temperature=0.7, top_k=16, eos_id=EOS, pad_id=PAD, epochs=2,
                       minibatches=2)


def two_member_scorer(params, tokens, mask):
  """Scores `[2, B]`: the counts of TARGET and of token 9 (an ensemble that disagrees)."""
  del params
  return jnp.stack([((tokens == t) & mask).sum(-1) for t in (TARGET, 9)]).astype(jnp.float32)


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_seeds_give_the_tokens_and_params_of_separate_runs(policy_params):
  section = dict(reward='mean', advantage='rloo', rloo=dict(group_size=2), loss='ppo_clip,kl_k2',
                 kl_k2=dict(coef=0.05))
  optimizer = optax.sgd(0.3)
  objective = objectives.build(section)
  batch = left_padded_prompts(4)
  frozen = it.Frozen(ref_params=policy_params, reward_params=None)
  seeds = (0, 1, 2)
  starts = [it.init_state(it.init_params(None, policy_params, None), optimizer, jax.random.key(s), objective)
            for s in seeds]
  single = jax.jit(it.make_functions(TINY, section, SETTINGS, count_scorer, optimizer).iteration_samples)
  separate = [single(s, frozen, batch) for s in starts]
  iteration, _ = pop.make_population_functions(TINY, section, SETTINGS, count_scorer, optimizer)
  pstate = pop.PopulationState(jax.tree.map(lambda *x: jnp.stack(x), *starts), {})
  new, metrics, samples = jax.jit(iteration)(pstate, frozen, batch)
  for i, (state, m, s) in enumerate(separate):
    # The same sampled tokens, exactly, and the same updated parameters within 1e-5.
    np.testing.assert_array_equal(np.asarray(samples.tokens[i]), np.asarray(s.tokens))
    _assert_trees_close(pop.member_slice(new.members, i).params, state.params, 1e-5)
    assert float(metrics['loss'][i]) == pytest.approx(float(m['loss']), abs=1e-5)
  # The seeds did differ (the check above is not vacuous).
  assert not np.array_equal(np.asarray(samples.tokens[0]), np.asarray(samples.tokens[1]))


def test_hyperparameters_give_the_params_of_separate_runs(policy_params):
  base = dict(reward='uwo', uwo=dict(lam=0.5), advantage='grpo', grpo=dict(group_size=2), loss='ppo_clip,kl_k2',
              kl_k2=dict(coef=0.05))
  values = {'objective.uwo.lam': [0.0, 2.0], 'objective.kl_k2.coef': [0.01, 0.3], 'optim.lr': [0.3, 0.1]}
  optim_config = config_lib.optim(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0)
  optim_config.name = 'sgd'
  batch = left_padded_prompts(4)
  frozen = it.Frozen(ref_params=policy_params, reward_params=None)
  separate = []
  for i in range(2):  # each member as its own run: static values, a plain optimizer at its rate
    section = dict(base, uwo=dict(lam=values['objective.uwo.lam'][i]), kl_k2=dict(coef=values['objective.kl_k2.coef'][i]))
    member_optim = config_lib.optim(lr=values['optim.lr'][i], warmup_steps=0, schedule='constant', weight_decay=0.0)
    member_optim.name = 'sgd'
    optimizer = optim.make_optimizer(member_optim, 10)
    state = it.init_state(it.init_params(None, policy_params, None), optimizer, jax.random.key(0),
                          objectives.build(section))
    fn = jax.jit(it.make_functions(TINY, section, SETTINGS, two_member_scorer, optimizer).iteration)
    separate.append(fn(state, frozen, batch))
  optimizer = pop.lr_optimizer(optim_config, 10)
  start = it.init_state(it.init_params(None, policy_params, None), optimizer, jax.random.key(0), objectives.build(base))
  members = jax.tree.map(lambda x: jnp.stack([x, x]), start)
  members = members._replace(opt_state=pop.set_lr(members.opt_state, jnp.asarray(values['optim.lr'])))
  pstate = pop.PopulationState(members, {k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  iteration, _ = pop.make_population_functions(TINY, base, SETTINGS, two_member_scorer, optimizer)
  new, metrics, _ = jax.jit(iteration)(pstate, frozen, batch)
  for i, (state, m) in enumerate(separate):
    _assert_trees_close(pop.member_slice(new.members, i).params, state.params, 1e-5)
    for k in ('loss', 'reward/transformed', 'kl/k1'):
      assert float(metrics[k][i]) == pytest.approx(float(m[k]), abs=1e-5), k
  # The members did differ: different λ give different transformed rewards, different rates different steps.
  assert float(metrics['reward/transformed'][0]) != pytest.approx(float(metrics['reward/transformed'][1]), abs=1e-3)


def test_population_job_members_read_as_separate_runs(tmp_path):
  config = _config('grpo')
  config.train.steps = 2
  config.optim.update(name='sgd', lr=0.3)
  config.population.seeds = '3,4'
  config.population.hparams = 'objective.kl_k3.coef=0.02,0.2'
  trainer.run(config, tmp_path / 'population')
  members = pop.parse_members(config)
  assert members == [pop.Member(3, {'objective.kl_k3.coef': 0.02}), pop.Member(4, {'objective.kl_k3.coef': 0.2})]
  # Member 1 run alone (a fresh policy from seed 4, its own KL coefficient) ends at its parameters.
  alone = pop.member_config(config, members[1])
  trainer.run(alone, tmp_path / 'alone')
  state, meta = checkpoint.load(tmp_path / 'population' / 'members' / '1' / 'checkpoints')
  ref, ref_meta = checkpoint.load(tmp_path / 'alone' / 'checkpoints')
  assert meta['kind'] == ref_meta['kind'] == 'rl_policy' and meta['config'] == ref_meta['config']
  _assert_trees_close(state['params'], ref['params'], 1e-5)
  # Its metrics file reads like the separate run's (the same names; values within 1e-4).
  got, want = (read_metrics(p / 'metrics.jsonl') for p in (tmp_path / 'population' / 'members' / '1', tmp_path / 'alone'))
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w) - {'train/steps_per_sec'}
    for k in g:
      assert g[k] == pytest.approx(w[k], abs=1e-4), k
  assert (tmp_path / 'population' / 'members' / '0' / 'rollouts' / '2.jsonl').is_file()
  trainer.load_policy(str(tmp_path / 'population' / 'members' / '0' / 'checkpoints'))


def test_bad_population_configs_raise():
  config = _config('grpo')
  config.population.hparams = 'rl.temperature=0.5,1.0'
  with pytest.raises(config_lib.ConfigError, match='cannot vary'):
    pop.parse_members(config)
  config.population.hparams = 'objective.grpo.group_size=2,4'
  with pytest.raises(config_lib.ConfigError, match='not a float'):
    pop.parse_members(config)
  config.population.hparams = 'objective.kl_k3.coef=0.1,0.2'
  config.population.seeds = '0,1,2'
  with pytest.raises(config_lib.ConfigError, match='each must'):
    pop.parse_members(config)
