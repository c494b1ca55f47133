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
