"""launch.local: a failing point does not stop the others; a killed sweep resumes without redoing points
(on toy jobs: the real jobs run through a launcher in tests/launch/test_tpu_slurm.py)."""
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
RUNNER = [sys.executable, '-m', 'launch.local']


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


def test_points_run_with_the_repository_on_the_path_and_glibc_malloc_on_huge_pages():
  from launch import local
  env = local.point_env({'PYTHONPATH': 'lib', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'HOME': '/h'})
  assert env == {'PYTHONPATH': f'{ROOT.resolve()}{os.pathsep}lib', 'HOME': '/h',
                 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}
  assert local.point_env({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  # A user's own choice stays.
  assert local.point_env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=0'


def test_bad_override_stops_before_any_point_runs(tmp_path):
  out = subprocess.run(RUNNER + ['--config=configs/sweeps/rm_lr.py:test', f'--workdir={tmp_path}',
                                 '--config.optim.lrr=1'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
  assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_a_failing_point_is_reported_and_the_others_finish(tmp_path):
  config, workdir = _toy_sweep(tmp_path), tmp_path / 'sweep'
  cmd = RUNNER + [f'--config={config}', f'--workdir={workdir}', '--parallel=2']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
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
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert [_starts(workdir, n) for n in ('fail=False,x=1.0', bad, 'fail=False,x=3.0')] == [1, 2, 1]


def test_fixed_overrides_apply_to_every_point_and_metrics_fall_back_to_the_metrics_file(tmp_path):
  config, workdir = _toy_sweep(tmp_path), tmp_path / 'sweep'
  config.write_text(config.read_text().replace('(False, True, False)', '(False, False, False)'))
  out = subprocess.run(RUNNER + [f'--config={config}', f'--workdir={workdir}', '--parallel=3',
                                 '--config.metrics_only=True'], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(r['metrics']['y'] for r in _records(workdir).values()) == [1.0, 8.0, 27.0]


def test_sweep_killed_and_restarted_finishes_without_redoing_points(tmp_path):
  # Four points of the toy counter on the real training loop: 30 steps of 0.1 s, a checkpoint every 2.
  config = tmp_path / 'count_sweep.py'
  config.write_text('from launch import sweep\n'
                    'from tests.launch import toy_job\n'
                    'get_config = toy_job.get_config\n'
                    'def get_sweep():\n'
                    '  return sweep.axis("x", (1.0, 2.0, 3.0, 4.0))\n')
  workdir = tmp_path / 'sweep'
  cmd = RUNNER + [f'--config={config}', f'--workdir={workdir}', '--parallel=2', '--config.train.steps=30']
  runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  started = set()
  while time.time() < deadline and runner.poll() is None:
    # Kill once a point is finished and another is inside its loop (a first checkpoint, not the
    # last), so that there is both something to skip and something to resume.
    names = [p.name for p in workdir.iterdir() if p.is_dir()] if workdir.is_dir() else []
    finished = {n for n in names if (workdir / n / 'result.json').exists()}
    started = {n for n in names if n not in finished and (workdir / n / 'count' / 'checkpoints' / '4').is_dir()
               and not (workdir / n / 'count' / 'checkpoints' / '20').exists()}
    if finished and started:
      break
    time.sleep(0.05)
  assert runner.poll() is None, 'the sweep ended before it could be killed: ' + runner.stderr.read()[-2000:]
  running = [r['pid'] for r in _records(workdir).values() if r['status'] == 'running']
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
  names = [p.name for p in workdir.iterdir() if p.is_dir()]
  finished = {n for n in names if (workdir / n / 'result.json').exists()}
  interrupted = set(names) - finished
  assert started & interrupted, 'no point with a checkpoint was interrupted'
  done_times = {n: (workdir / n / 'result.json').stat().st_mtime_ns for n in finished}

  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  records = _records(workdir)
  assert len(records) == 4 and all(r['status'] == 'done' for r in records.values())
  for n in finished:  # not redone
    assert (workdir / n / 'result.json').stat().st_mtime_ns == done_times[n] and _starts(workdir, n) == 1
  for n in interrupted:  # started again once, resuming from its checkpoint
    assert _starts(workdir, n) == 2
  # Resumed from the checkpoint, not from scratch and not twice over: 30 additions of x exactly.
  assert {r['overrides']['x']: r['metrics']['total'] for r in records.values()} == {
      1.0: 30.0, 2.0: 60.0, 3.0: 90.0, 4.0: 120.0}
  table = (workdir / 'sweep.md').read_text()
  assert all(f'| {n} |' in table for n in records) and table.count('| done |') == 4

