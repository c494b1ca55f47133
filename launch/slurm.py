"""SLURM launcher: one submitit job per sweep point, as one job array.

  python -m launch.slurm --config=configs/sweeps/rm_lr.py:tiny --workdir=DIR --partition=gpu \\
      --nodes=2 --tasks_per_node=8 --gpus_per_node=8 --time_min=240 [--wait] [--config.a.b=v ...]

Each point runs `python -m launch.point` (the same command as `launch.local`) in
`DIR/<point name>/`, once per task; with several tasks `jax.distributed` is initialised in each
from `submitit.JobEnvironment()` (`rmjax.parallel.initialize_from_env`). Finished points (with a
`result.json`) are not submitted again. `DIR/slurm_jobs.jsonl` lists the submitted jobs; with
`--wait` the launcher waits and writes `DIR/sweep.jsonl` and `DIR/sweep.md` as `launch.local` does.

Preemption and time-out: SLURM sends SIGTERM (preemption) or, `--signal_delay_s` before the
time limit, SIGUSR2. The task forwards it to the point, whose training loop writes a checkpoint
at the next step boundary and exits with `PREEMPTED_EXIT_CODE`; task 0 then hands the signal to
submitit, which pickles the job again and requeues it (`scontrol requeue`; the local executor
restarts it), and the requeued job resumes from that checkpoint. `--executor=local` runs the
same jobs on this machine through submitit's local executor (for tests and laptops).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import submitit

from rmjax import config as config_lib

from launch import local
from launch import point as point_lib

JOBS_FILE = 'slurm_jobs.jsonl'
SUBMITIT_DIR = 'submitit'


class PointJob(submitit.helpers.Checkpointable):
  """The submitted callable: runs one point's command in a child process and returns its metrics.

  Requeued as itself on preemption or time-out (`checkpoint` keeps the same arguments); the point
  resumes from its own checkpoints, so no state is pickled.
  """

  def __init__(self, command: Sequence[str], workdir: str, env: dict[str, str]):
    self.command, self.workdir, self.env = list(command), workdir, dict(env)

  def __call__(self) -> dict[str, Any]:
    forwarded = {'signal': None}
    child = subprocess.Popen(self.command, env={**os.environ, **self.env})

    def forward(signum, _frame):
      forwarded['signal'] = signum
      if child.poll() is None:
        child.send_signal(signum)

    usr_sig = getattr(signal, 'SIG' + os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2'))
    submitit_handler = signal.getsignal(usr_sig)
    for s in {signal.SIGTERM, usr_sig}:
      signal.signal(s, forward)
    rc = child.wait()
    for s in {signal.SIGTERM, usr_sig}:
      signal.signal(s, signal.SIG_DFL)
    signal.signal(usr_sig, submitit_handler)
    if rc == point_lib.PREEMPTED_EXIT_CODE or (forwarded['signal'] is not None and rc != 0):
      # submitit's handler checkpoints this callable and requeues the job (task 0) or returns.
      signal.raise_signal(usr_sig)
      raise RuntimeError(f'the point stopped on signal {forwarded["signal"]} (exit code {rc}); the job is requeued.')
    if rc != 0:
      raise RuntimeError(f'the point failed with exit code {rc}; see the job log and {self.workdir}/log.txt.')
    result = point_lib.read_result(self.workdir)
    if result is None:
      raise RuntimeError(f'the point exited without writing {self.workdir}/{point_lib.RESULT_FILE}.')
    return result


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog='python -m launch.slurm',
      description='Submit every unfinished point of a config\'s get_sweep() as a SLURM job (one job array) with '
                  'submitit; preempted or timed-out jobs checkpoint, requeue and resume. Extra --config.a.b=v '
                  'flags apply to every point.')
  parser.add_argument('--config', required=True, help='config file and argument, e.g. configs/sweeps/rm_lr.py:tiny')
  parser.add_argument('--workdir', required=True, help='sweep directory (on a file system every node sees)')
  parser.add_argument('--executor', default='slurm', choices=('slurm', 'local'),
                      help='slurm, or local: submitit\'s local executor on this machine')
  parser.add_argument('--partition', default='', help='SLURM partition')
  parser.add_argument('--account', default='', help='SLURM account')
  parser.add_argument('--qos', default='', help='SLURM quality of service')
  parser.add_argument('--nodes', type=int, default=1, help='nodes per point')
  parser.add_argument('--tasks_per_node', type=int, default=1, help='processes per node (one per GPU is usual)')
  parser.add_argument('--gpus_per_node', type=int, default=0)
  parser.add_argument('--cpus_per_task', type=int, default=4)
  parser.add_argument('--mem_gb', type=int, default=0, help='memory per node (0: the partition default)')
  parser.add_argument('--time_min', type=int, default=60, help='time limit of one job in minutes')
  parser.add_argument('--signal_delay_s', type=int, default=120, help='SIGUSR2 this long before the time limit')
  parser.add_argument('--max_num_timeout', type=int, default=10, help='requeues after time-outs before giving up')
  parser.add_argument('--array_parallelism', type=int, default=64, help='points of the array running at once')
  parser.add_argument('--setup', action='append', default=[], help='shell line run before each job (repeatable)')
  parser.add_argument('--wait', action='store_true', help='wait for every job and write sweep.jsonl / sweep.md')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognized arguments {bad}; only --config.a.b=v overrides may follow.')
  return args, rest


def make_executor(args: argparse.Namespace, folder: pathlib.Path) -> submitit.Executor:
  executor = submitit.AutoExecutor(folder=str(folder), cluster=args.executor,
                                   slurm_max_num_timeout=args.max_num_timeout)
  params: dict[str, Any] = dict(timeout_min=args.time_min, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                                gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                                name='rmjax', slurm_signal_delay_s=args.signal_delay_s,
                                slurm_array_parallelism=args.array_parallelism)
  if args.mem_gb:
    params['mem_gb'] = args.mem_gb
  for key, value in (('slurm_partition', args.partition), ('slurm_account', args.account),
                     ('slurm_qos', args.qos)):
    if value:
      params[key] = value
  if args.setup:
    params['slurm_setup'] = list(args.setup)
  executor.update_parameters(**params)
  return executor


def submit(args: argparse.Namespace, fixed: Sequence[str]) -> tuple[list[local.Point], list[Any]]:
  """Submits the unfinished points; returns (every point, the jobs of the submitted ones)."""
  config_file, _, arg = args.config.partition(':')
  spec = f'{pathlib.Path(config_file).resolve()}' + (f':{arg}' if arg else '')
  workdir = pathlib.Path(args.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  points = local.prepare(spec, fixed)
  todo = []
  for p in points:
    result = point_lib.read_result(workdir / p.name)
    if result is not None:
      p.status, p.metrics = 'done', result
    else:
      todo.append(p)
  env = {k: v for k, v in local.point_env(os.environ).items() if k in ('PYTHONPATH', 'GLIBC_TUNABLES')}
  jobs = []
  if not todo:
    return points, jobs
  executor = make_executor(args, workdir / SUBMITIT_DIR)
  with executor.batch():
    for p in todo:
      (workdir / p.name).mkdir(parents=True, exist_ok=True)
      command = local.point_command(spec, workdir, p, fixed) + ['--nolock']
      jobs.append(executor.submit(PointJob(command, str(workdir / p.name), env)))
  with open(workdir / JOBS_FILE, 'a') as f:
    for p, job in zip(todo, jobs):
      p.status = 'submitted'
      f.write(json.dumps(dict(name=p.name, job_id=job.job_id, overrides=p.overrides, time=time.time())) + '\n')
  return points, jobs


def wait(points: Sequence[local.Point], jobs: Sequence[Any], workdir: pathlib.Path) -> None:
  """Blocks until each submitted job ends; records its status and metrics."""
  submitted = [p for p in points if p.status == 'submitted']
  for p, job in zip(submitted, jobs):
    try:
      p.metrics, p.status = job.result(), 'done'
    except Exception as e:  # pylint: disable=broad-except  # a failed point is reported, the others go on
      p.status = 'failed'
      print(f'point {p.name} failed: {e}', file=sys.stderr)
    local.write_records(workdir, points)
  (workdir / local.TABLE_FILE).write_text(local.table(points))


def main(argv: Sequence[str] | None = None) -> int:
  args, fixed = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    points, jobs = submit(args, fixed)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for p, job in zip([p for p in points if p.status == 'submitted'], jobs):
    print(f'{p.name}: job {job.job_id}')
  print(f'{len(jobs)} jobs submitted, {sum(p.status == "done" for p in points)} points already done.')
  if not args.wait:
    return 0
  workdir = pathlib.Path(args.workdir).resolve()
  wait(points, jobs, workdir)
  print(local.table(points))
  return 0 if all(p.status == 'done' for p in points) else 1


if __name__ == '__main__':
  sys.exit(main())
