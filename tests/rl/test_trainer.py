"""The RL trainer job: configs run, metrics and rollouts are written, kill-and-resume is exact."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from rmjax.rl import trainer
from rmjax.train import checkpoint, loop

ROOT = pathlib.Path(__file__).parent.parent.parent


def _config(name: str, arg: str = 'test'):
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name', ['ppo', 'rloo', 'grpo'])
def test_configs_validate_in_both_variants(name):
  for arg in ('tiny', 'test'):
    trainer.validate(_config(name, arg))


def test_kill_and_resume_ends_at_the_same_parameters(tmp_path):
  config = _config('ppo')
  trainer.run(config, tmp_path / 'straight')
  broken = _config('ppo')
  broken.train.fail_at_step = 3
  with pytest.raises(loop.InjectedFailure):
    trainer.run(broken, tmp_path / 'resumed')
  trainer.run(_config('ppo'), tmp_path / 'resumed')
  a, meta_a = checkpoint.load(tmp_path / 'straight' / 'checkpoints')
  b, meta_b = checkpoint.load(tmp_path / 'resumed' / 'checkpoints')
  assert meta_a['final'] and meta_b['final'] and meta_a['data_step'] == 6
  # Params, optimizer, controller / reward state and rng: bitwise equal on CPU.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Per-iteration metrics and the rollout samples of each checkpoint are in the workdir.
  rows = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').read_text().splitlines()]
  keys = set().union(*rows)
  for k in ('train/reward/raw', 'train/reward/transformed', 'train/kl/k1', 'train/kl/k3', 'train/kl/exact',
            'train/entropy', 'train/clip_fraction', 'train/response_length', 'eval/reward/raw', 'eval/kl/exact'):
    assert k in keys, k
  rollout = [json.loads(line) for line in (tmp_path / 'straight' / 'rollouts' / '6.jsonl').read_text().splitlines()]
  assert len(rollout) == 4 * 4 and {'prompt_id', 'text', 'tokens', 'scores', 'gold'} <= set(rollout[0])
  # The toy reward counts its token over prompt + response: the saved scores are those counts.
  for r in rollout:
    assert r['scores'] == [float((r['prompt_tokens'] + r['tokens']).count(config.reward.toy_token))]


def test_bon_job_writes_curves(tmp_path):
  from rmjax.rl import bon_job
  result = bon_job.run(_config('bon'), tmp_path)
  assert json.loads((tmp_path / 'bon.json').read_text()) == result
  assert result['n'] == [1, 4, 64]
  # Proxy curve non-decreasing in n; the plug-in KL never exceeds the analytic bound (+ rounding).
  assert np.all(np.diff(result['proxy']) >= -1e-9)
  assert np.all(np.array(result['kl_plugin']) <= np.array(result['kl_bound']) + 1e-9)
  assert result['kl_plugin'][0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('kind', ['full', 'multi_head'])
def test_select_members_scores_exactly_the_chosen_members(kind):
  from rmjax import config as config_lib
  from rmjax import objectives
  from rmjax.models.reward_model import RewardModel
  from tests.rl.conftest import TINY
  rm = RewardModel(TINY, num_members=3, kind=kind)
  params = jax.jit(rm.init)(jax.random.key(0))
  stats = objectives.RewardStats(np.array([1., 2., 3.], np.float32), np.array([4., 5., 6.], np.float32))
  tokens = np.arange(2, 14, dtype=np.int32).reshape(2, 6)
  mask = np.ones((2, 6), bool)
  full = np.asarray(jax.jit(rm.apply)(params, tokens, mask))
  scorer, sub, sub_stats = trainer.select_members(rm, params, stats, '2,0')
  np.testing.assert_allclose(np.asarray(jax.jit(scorer)(sub, tokens, mask)), full[[2, 0]], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(sub_stats.mean, [3., 1.])
  np.testing.assert_array_equal(sub_stats.std, [6., 4.])
  assert trainer.select_members(rm, params, stats, '')[1] is params
  for bad in ('3', '0,0', 'a'):
    with pytest.raises(config_lib.ConfigError, match='config.reward.members'):
      trainer.select_members(rm, params, stats, bad)


def test_ref_samples_file_must_hold_one_row_per_prompt_id(tmp_path):
  from rmjax import config as config_lib
  path = tmp_path / 'ref.npy'
  np.save(path, np.zeros((5, 3)))
  assert trainer.load_ref_samples(str(path), 5).shape == (5, 3) and trainer.load_ref_samples('', 5) is None
  with pytest.raises(config_lib.ConfigError, match=r'config.reward.ref_samples=.*expected \[6, N\].*found \[5, 3\]'):
    trainer.load_ref_samples(str(path), 6)
  with pytest.raises(config_lib.ConfigError, match='config.reward.ref_samples=.*cannot read'):
    trainer.load_ref_samples(str(tmp_path / 'missing.npy'), 6)
