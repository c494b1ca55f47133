"""The DPO / IPO trainer: log 2 at π = π_ref, learning a toy preference, exact kill-and-resume."""
import jax
import numpy as np
import optax
import pytest

from rmjax import objectives
from rmjax.data import ByteTokenizer, PairBatches
from rmjax.models import transformer
from rmjax.rl import dpo
from rmjax.train import checkpoint, loop, read_metrics
from rmjax.train import state as state_lib


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted `configs/dpo.py:test` run (8 steps on the toy preference)."""
  workdir = tmp_path_factory.mktemp('dpo_straight')
  dpo.run(dpo.get_config('test'), workdir)
  return workdir


@pytest.mark.parametrize('loss', ['dpo', 'ipo'])
def test_loss_at_the_reference_policy(loss):
  config = dpo.get_config(f'test,{loss}')
  model = dpo.config_lib.model_config(config.policy.model, vocab_size=259)
  params = transformer.init_lm(jax.random.key(0), model)
  tok = ByteTokenizer()
  pairs = PairBatches(dpo.toy_pairs(8, seed=0, letter='e', grammar_seed=0), tok, seq_len=48, global_batch_size=8,
                      seed=0)[0]
  loss_fn = objectives.build(config.objective).preference_loss
  optimizer = optax.sgd(0.1)
  step = dpo.make_train_step(model, loss_fn, optimizer)
  _, metrics = step(state_lib.create(jax.tree.map(np.array, params), optimizer, jax.random.key(1)), params, pairs)
  # π = π_ref: every log-ratio is 0 up to float32 rounding (the same function of the same params,
  # computed twice in one program), so the DPO loss is softplus(0) = log 2 and the IPO loss
  # (0 − 1/(2τ))² = 25 for τ = 0.1, within 1e-6 relative.
  want = np.log(2.0) if loss == 'dpo' else (1 / (2 * 0.1)) ** 2
  assert float(metrics['loss']) == pytest.approx(want, rel=1e-6)
  assert abs(float(metrics['margin'])) <= 1e-6
  assert float(metrics['grad_norm']) > 0


def test_gradient_accumulation_matches_one_batch():
  # 8 pairs, the last 3 padding (weight 0), as 1, 2 or 4 microbatches: the weighted mean is over the
  # whole batch's weight, so the metrics and the updated parameters agree to float rounding, and the
  # microbatches are unequal in weight (2 of 4 hold padding), so a mean of per-microbatch means would
  # differ. The metrics' tolerance is absolute, 2e-6: a log-ratio (≈ 0.1) is the difference of summed
  # log-probs (up to ≈ 250 in size here, float32 steps up to 1.5e-5), and the dots round differently
  # for 8, 4 or 2 rows (2.8e-7 seen on one CPU).
  config = dpo.get_config('test')
  model = dpo.config_lib.model_config(config.policy.model, vocab_size=259)
  ref = transformer.init_lm(jax.random.key(0), model)
  policy = transformer.init_lm(jax.random.key(5), model)
  pairs = PairBatches(dpo.toy_pairs(5, seed=0, letter='e', grammar_seed=0), ByteTokenizer(), seq_len=48,
                      global_batch_size=8, seed=0, drop_remainder=False)[0]
  assert pairs['weight'].tolist() == [1] * 5 + [0] * 3
  loss_fn = objectives.build(config.objective).preference_loss
  optimizer = optax.sgd(0.5)
  out = {}
  for n in (1, 2, 4):
    step = dpo.make_train_step(model, loss_fn, optimizer, grad_accum_steps=n)
    state, metrics = step(state_lib.create(jax.tree.map(np.array, policy), optimizer, jax.random.key(1)), ref, pairs)
    out[n] = (jax.device_get(metrics), jax.device_get(state.params))
  assert abs(out[1][0]['margin']) > 1e-3  # π ≠ π_ref: the margins are not all zero
  for n in (2, 4):
    for k, v in out[1][0].items():
      np.testing.assert_allclose(out[n][0][k], v, rtol=1e-6, atol=2e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(out[n][1]), jax.tree.leaves(out[1][1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_few_steps_learn_the_toy_preference(straight):
  rows = read_metrics(straight / 'metrics.jsonl')
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [4, 8]
  # At π = π_ref every margin is 0 (loss log 2). After 8 steps at lr 1e-2 the implicit
  # reward prefers the held-out chosen responses (the ones rich in 'e') almost always.
  assert evals[-1]['eval/accuracy'] >= 0.9, evals
  assert evals[-1]['eval/loss'] < np.log(2.0) - 0.1 and evals[-1]['eval/margin'] > 0
  assert rows[-1]['train/loss'] < rows[0]['train/loss']


def test_kill_and_resume_ends_at_the_same_parameters(straight, tmp_path):
  broken = dpo.get_config('test')
  broken.train.fail_at_step = 5
  with pytest.raises(loop.InjectedFailure):
    dpo.run(broken, tmp_path)
  dpo.run(dpo.get_config('test'), tmp_path)
  a, meta_a = checkpoint.load(straight / 'checkpoints')
  b, meta_b = checkpoint.load(tmp_path / 'checkpoints')
  assert meta_a['final'] and meta_b['final'] and meta_a['kind'] == 'causal_lm'
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU
  # The resumed run's metrics file reads as the uninterrupted one's (the speed aside).
  drop = lambda rows: [{k: v for k, v in r.items() if k != 'train/steps_per_sec'} for r in rows]
  assert drop(read_metrics(tmp_path / 'metrics.jsonl')) == drop(read_metrics(straight / 'metrics.jsonl'))


def test_bad_config_raises():
  config = dpo.get_config('test')
  config.data.source = 'tfds'
  with pytest.raises(dpo.config_lib.ConfigError, match='data.path'):
    dpo.validate(config)
  config = dpo.get_config('test')
  config.train.grad_accum_steps = 3
  with pytest.raises(dpo.config_lib.ConfigError, match='data.batch_size=16'):
    dpo.validate(config)
  with pytest.raises(ValueError, match='unknown variant'):
    dpo.get_config('test,kto')


def test_population_members_are_the_separate_runs(tmp_path):
  # Two members differing in seed (pair order and fresh policy) and β, as one vmapped program:
  # each ends where its own run ends, within float32 rounding of the batched reductions (1e-5).
  import json
  from rmjax.rl import population
  config = dpo.get_config('test')
  files = []  # the pairs on file, so every run reads the same ones (the toy source depends on the seed)
  for split, num in (('train', 128), ('eval', 32)):
    path = tmp_path / f'{split}.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in dpo.toy_pairs(num, seed=len(files), letter='e',
                                                                         grammar_seed=0)))
    files.append(f'{split}={path}')
  config.data.update(dict(source='jsonl', path=','.join(files)))
  config.population.update(dict(seeds='3,4', hparams='objective.dpo.beta=0.1,0.5'))
  dpo.run(config, tmp_path / 'population')
  members = population.parse_members(config)
  assert [(m.seed, m.values) for m in members] == [(3, {'objective.dpo.beta': 0.1}), (4, {'objective.dpo.beta': 0.5})]
  for i, member in enumerate(members):
    single = population.member_config(config, member)
    dpo.run(single, tmp_path / str(i))
    alone, _ = checkpoint.load(tmp_path / str(i) / 'checkpoints')
    together, meta = checkpoint.load(tmp_path / 'population' / 'members' / str(i) / 'checkpoints')
    assert meta['kind'] == 'causal_lm' and meta['config']['seed'] == member.seed
    for x, y in zip(jax.tree.leaves(alone['params']), jax.tree.leaves(together['params'])):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    rows_alone = [r for r in read_metrics(tmp_path / str(i) / 'metrics.jsonl') if 'eval/loss' in r]
    rows_member = [r for r in read_metrics(tmp_path / 'population' / 'members' / str(i) / 'metrics.jsonl')
                   if 'eval/loss' in r]
    assert [r['step'] for r in rows_member] == [r['step'] for r in rows_alone] == [4, 8]
    assert rows_member[-1]['eval/loss'] == pytest.approx(rows_alone[-1]['eval/loss'], rel=1e-4)
  # the two members differ (seed and β), so the comparison above can fail
  a, _ = checkpoint.load(tmp_path / '0' / 'checkpoints')
  b, _ = checkpoint.load(tmp_path / '1' / 'checkpoints')
  assert not np.allclose(jax.tree.leaves(a['params'])[0], jax.tree.leaves(b['params'])[0])
