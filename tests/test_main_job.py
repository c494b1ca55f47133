"""The reward-model job end to end (configs/rm.py:test): runs, and resumes exactly after `kill -9`."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rmjax.train import checkpoint

ROOT = pathlib.Path(__file__).parent.parent
# The subprocesses share the tests' persistent compilation cache (tests/conftest.py).
CMD = [sys.executable, '-m', 'rmjax.main', '--config=configs/rm.py:test', '--config.train.progress=False',
       '--config.world.policy.train.progress=False']


def _run(workdir, timeout=600):
  out = subprocess.run(CMD + [f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads((workdir / 'rm' / 'eval.json').read_text())


def _final_params(workdir):
  state, meta = checkpoint.load(workdir / 'rm' / 'checkpoints')
  assert meta['final']
  return state['params']


@pytest.fixture(scope='module')
def uninterrupted(world):
  # The session's run of this job (tests/conftest.py), which the RL tests read too.
  return world, json.loads((world / 'rm' / 'eval.json').read_text())


@pytest.mark.slow
def test_main_job_writes_results(uninterrupted):
  workdir, result = uninterrupted
  assert {'eval/accuracy', 'eval/gold_accuracy', 'eval/loss', 'eval/accuracy_0', 'eval/accuracy_1'} <= set(result)
  assert all(np.isfinite(v) for v in result.values())
  lines = [json.loads(l) for l in (workdir / 'rm' / 'metrics.jsonl').read_text().splitlines()]
  assert lines[-1]['step'] == 24 and 'eval/accuracy' in lines[-1]
  _, meta = checkpoint.load(workdir / 'rm' / 'checkpoints')
  # Self-describing: model, tokenizer, normalization, config and its hash, code version.
  assert meta['model']['num_members'] == 2 and meta['tokenizer'] and len(meta['normalization']['mean']) == 2
  assert meta['config']['ensemble']['members'] == 2 and meta['config_hash'] and meta['code']
  assert list((workdir / 'rm' / 'tensorboard').iterdir())


@pytest.mark.slow
def test_kill_9_then_rerun_ends_at_the_same_parameters(uninterrupted, tmp_path):
  ref_dir, ref_result = uninterrupted
  proc = subprocess.Popen(CMD + [f'--workdir={tmp_path}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'rm' / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # kill mid reward-model training
    if metrics.exists() and any(json.loads(l)['step'] >= 16 for l in metrics.read_text().splitlines() if l.strip()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed: ' + proc.stderr.read()[-2000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  result = _run(tmp_path)
  assert result == ref_result
  for a, b in zip(_flat(_final_params(tmp_path)), _flat(_final_params(ref_dir))):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
