"""launch.tpu against a fake `gcloud` that records its calls, and launch.slurm through submitit's local
executor with a real interrupt (SIGUSR2 to the running task), checkpoint, requeue and resume."""
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import pytest

from launch import slurm

ROOT = pathlib.Path(__file__).parent.parent.parent
TPU_ARGS = ['--tpu=pod1', '--zone=us-central2-b', '--config=configs/sweeps/rm_lr.py:small', '--workdir=/mnt/sweep',
            '--accelerator_type=v4-32', '--run=r1', '--config.train.steps=10']


@pytest.mark.parametrize('launcher', ['launch.slurm', 'launch.tpu'])
def test_help_exits_zero(launcher):
  out = subprocess.run([sys.executable, '-m', launcher, '--help'], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0 and out.stdout.startswith('usage: python -m ' + launcher)


def _fake_gcloud(tmp_path, describe_status):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls.jsonl'
  script = bin_dir / 'gcloud'
  script.write_text(f'#!{sys.executable}\n'
                    'import json, sys\n'
                    f'open({str(calls)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
                    f'sys.exit({describe_status} if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "describe"] else 0)\n')
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'), calls


def _tpu(env, tmp_path, *extra):
  return subprocess.run([sys.executable, '-m', 'launch.tpu', *TPU_ARGS, f'--logs={tmp_path / "logs"}', *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('exists', [False, True])
def test_tpu_creates_or_reuses_the_vm_installs_everywhere_and_runs_on_all_workers(tmp_path, exists):
  env, calls = _fake_gcloud(tmp_path, describe_status=0 if exists else 1)
  out = _tpu(env, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  got = [json.loads(l) for l in calls.read_text().splitlines()]
  verbs = [c[3] for c in got]
  assert verbs == ['describe'] + ([] if exists else ['create']) + ['scp', 'ssh', 'ssh', 'scp']
  assert all(c[:3] == ['compute', 'tpus', 'tpu-vm'] and '--zone=us-central2-b' in c for c in got)
  if not exists:
    assert got[1][4] == 'pod1' and '--accelerator-type=v4-32' in got[1]
  copy, install, run, logs = got[-4:]
  assert copy[4].endswith('rmjax.tar.gz') and copy[5] == 'pod1:~/rmjax.tar.gz' and '--worker=all' in copy
  assert '--worker=all' in install and 'pip install' in install[6] and 'tar xzf' in install[6]
  command = next(a for a in run if a.startswith('--command='))
  assert '--worker=all' in run and ('python3 -m launch.local --config=configs/sweeps/rm_lr.py:small '
                                    '--workdir=/mnt/sweep --parallel=1 --config.train.steps=10') in command
  assert '~/rmjax_logs/r1/$(hostname).log' in command  # one log per worker
  assert logs[5] == 'pod1:~/rmjax_logs/r1/*' and logs[6] == str(tmp_path / 'logs' / 'r1')


def test_tpu_dry_run_prints_every_command_and_calls_nothing(tmp_path):
  env, calls = _fake_gcloud(tmp_path, describe_status=1)
  out = _tpu(dict(env, PATH='/usr/bin:/bin'), tmp_path, '--dry-run')  # no gcloud on PATH at all
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith('+ ')]
  assert [l.split()[1] for l in lines] == ['gcloud', 'gcloud', 'git', 'gcloud', 'gcloud', 'gcloud', 'gcloud']
  assert 'tpu-vm ssh pod1 --worker=all' in lines[5] and 'launch.local' in lines[5]
  assert not calls.exists()


@pytest.mark.slow
def test_slurm_local_executor_interrupt_requeue_and_resume(tmp_path):
  # The toy counter on the real training loop (total += x per step, 30 steps of 0.1 s, a checkpoint
  # every 2): an exact total after the requeue shows the resume neither lost nor repeated a step.
  config = tmp_path / 'count.py'
  config.write_text('from tests.launch import toy_job\nget_config = toy_job.get_config\n')
  args, fixed = slurm.parse_args([
      f'--config={config}', f'--workdir={tmp_path / "runs"}', '--executor=local', '--time_min=10',
      '--config.train.steps=30', '--config.x=2.0'])
  points, jobs = slurm.submit(args, fixed)
  assert len(jobs) == 1 and points[0].name == 'default'
  job = jobs[0]
  first = tmp_path / 'runs' / 'default' / 'count' / 'checkpoints' / '4'
  deadline = time.time() + 240
  while not first.exists() and time.time() < deadline and job.get_info()['jobState'] == 'RUNNING':
    time.sleep(0.05)
  assert first.exists(), job.paths.stderr.read_text()[-3000:]
  # What SLURM does before a time limit: SIGUSR2 to the task (the local executor's controller's child).
  controller = job._process.pid  # pylint: disable=protected-access
  task = int(pathlib.Path(f'/proc/{controller}/task/{controller}/children').read_text().split()[0])
  os.kill(task, signal.SIGUSR2)
  result = job.result()
  log = job.paths.stderr.read_text()
  assert 'checkpoint written at step' in log and 'Requeued job' in log
  assert log.count('preempted: signal 12') == 1  # stopped once, then resumed to the end
  assert result == json.loads((tmp_path / 'runs' / 'default' / 'result.json').read_text())
  assert result['total'] == 60.0  # 30 steps of += 2.0, across the requeue
  records = [json.loads(l) for l in (tmp_path / 'runs' / 'slurm_jobs.jsonl').read_text().splitlines()]
  assert [r['name'] for r in records] == ['default']
  # Submitting again: the point is finished and nothing is submitted.
  assert slurm.submit(args, fixed)[1] == []
