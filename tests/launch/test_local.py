"""launch.local: a failing point does not stop the others; a killed sweep resumes without redoing points."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parent.parent.parent
# The subprocesses share the tests' persistent compilation cache (tests/conftest.py).
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / '.jax_cache'),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
RUNNER = [sys.executable, '-m', 'launch.local']
# configs/rm.py:test made smaller still: the sweep's four points run in about 20 s each.
SMALL = ['--config.train.progress=False', '--config.world.policy.train.progress=False',
         '--config.world.policy.train.steps=4', '--config.train.steps=16', '--config.train.checkpoint_every=4',
         '--config.data.num_train=64', '--config.data.num_eval=32', '--config.world.num_documents=64']


def _records(workdir):
  return {r['name']: r for r in map(json.loads, (workdir / 'sweep.jsonl').read_text().splitlines())}


def _starts(workdir, name):
  return (workdir / name / 'log.txt').read_text().count('=== launch.local start')


def _toy_sweep(tmp_path):
  config = tmp_path / 'toy_sweep.py'
  config.write_text(
      'from launch import sweep\n'
      'from tests.launch import toy_job\n'
      'get_config = toy_job.get_config\n'
      'def get_sweep():\n'
      '  return sweep.zip(sweep.axis("x", (1.0, 2.0, 3.0)), sweep.axis("fail", (False, True, False)))\n')
  return config


def test_help_exits_zero():
  out = subprocess.run(RUNNER + ['--help'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and '--parallel' in out.stdout and 'usage' in out.stdout


def test_bad_override_stops_before_any_point_runs(tmp_path):
  out = subprocess.run(RUNNER + ['--config=configs/sweeps/rm_lr.py:test', f'--workdir={tmp_path}',
                                 '--config.optim.lrr=1'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
  assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_a_failing_point_is_reported_and_the_others_finish(tmp_path):
  config, workdir = _toy_sweep(tmp_path), tmp_path / 'sweep'
  cmd = RUNNER + [f'--config={config}', f'--workdir={workdir}', '--parallel=2']
  out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  bad = 'fail=True,x=2.0'
  assert f'point {bad} failed' in out.stderr and 'toy failure at x=2.0' in out.stderr
  records = _records(workdir)
  assert {n: r['status'] for n, r in records.items()} == {
      'fail=False,x=1.0': 'done', bad: 'failed', 'fail=False,x=3.0': 'done'}
  assert records[bad]['returncode'] != 0
  assert records['fail=False,x=3.0']['metrics'] == {'y': 9.0}
  assert records['fail=False,x=3.0']['overrides'] == {'x': 3.0, 'fail': False}
  table = (workdir / 'sweep.md').read_text().splitlines()
  assert table[0] == '| point | fail | x | status | y |' and len(table) == 5
  assert '| fail=False,x=1.0 | False | 1.0 | done | 1 |' in table
  # A second run starts only the failed point again.
  out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert [_starts(workdir, n) for n in ('fail=False,x=1.0', bad, 'fail=False,x=3.0')] == [1, 2, 1]


def test_fixed_overrides_apply_to_every_point_and_metrics_fall_back_to_the_metrics_file(tmp_path):
  config, workdir = _toy_sweep(tmp_path), tmp_path / 'sweep'
  config.write_text(config.read_text().replace('(False, True, False)', '(False, False, False)'))
  out = subprocess.run(RUNNER + [f'--config={config}', f'--workdir={workdir}', '--parallel=3',
                                 '--config.metrics_only=True'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(r['metrics']['y'] for r in _records(workdir).values()) == [1.0, 8.0, 27.0]


@pytest.mark.slow
def test_rm_sweep_killed_and_restarted_finishes_without_redoing_points(tmp_path):
  cmd = RUNNER + ['--config=configs/sweeps/rm_lr.py:test', f'--workdir={tmp_path}', '--parallel=2'] + SMALL
  runner = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  started = set()
  while time.time() < deadline and runner.poll() is None:
    # Kill once a point is finished and another is inside its reward-model training loop (a first
    # checkpoint, not the last): a signal there stops it at the next step; one that lands between
    # stages lets the point run on to its end, which would leave nothing to resume.
    names = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    finished = {n for n in names if (tmp_path / n / 'result.json').exists()}
    started = {n for n in names if n not in finished and (tmp_path / n / 'rm' / 'checkpoints' / '4').is_dir()
               and not (tmp_path / n / 'rm' / 'checkpoints' / '12').exists()}
    if finished and started:
      break
    time.sleep(0.1)
  assert runner.poll() is None, 'the sweep ended before it could be killed: ' + runner.stderr.read()[-2000:]
  running = [r['pid'] for r in _records(tmp_path).values() if r['status'] == 'running']
  os.kill(runner.pid, signal.SIGKILL)
  runner.wait()
  # The kernel sends the orphaned points SIGTERM; each writes a checkpoint and exits.
  for pid in running:
    for _ in range(600):
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      time.sleep(0.1)
    else:
      pytest.fail(f'point process {pid} outlived the killed runner')
  names = [p.name for p in tmp_path.iterdir() if p.is_dir()]
  finished = {n for n in names if (tmp_path / n / 'result.json').exists()}
  interrupted = set(names) - finished
  assert started & interrupted, 'no point with a checkpoint was interrupted'
  done_times = {n: (tmp_path / n / 'result.json').stat().st_mtime_ns for n in finished}

  out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  records = _records(tmp_path)
  assert len(records) == 4 and all(r['status'] == 'done' for r in records.values())
  for n in finished:  # not redone
    assert (tmp_path / n / 'result.json').stat().st_mtime_ns == done_times[n] and _starts(tmp_path, n) == 1
  for n in interrupted:  # started again once, resuming from its checkpoints
    assert _starts(tmp_path, n) == 2
  table = (tmp_path / 'sweep.md').read_text()
  assert all(f'| {n} |' in table for n in records) and table.count('| done |') == 4
  assert all(0.0 <= r['metrics']['eval/gold_accuracy'] <= 1.0 for r in records.values())
