"""TPU-pod launcher: one TPU VM (created or reused), the code on every worker, the sweep on all of them.

  python -m launch.tpu --tpu=NAME --zone=Z --config=configs/sweeps/rm_lr.py:small --workdir=DIR \\
      [--accelerator_type=v4-32] [--version=tpu-ubuntu2204-base] [--project=P] [--spot] [--dry-run] \\
      [--config.a.b=v ...]

Steps, each one `gcloud` command (printed; with `--dry-run` only printed, so it works where
`gcloud` is not installed):

1. `gcloud compute tpus tpu-vm describe NAME`; if that fails, `... tpu-vm create NAME
   --accelerator-type=... --version=...`.
2. The code: `git archive HEAD` of this repository as a tarball, copied to every worker
   (`tpu-vm scp --worker=all`) and installed there (`pip install -e . jax[tpu]`).
3. The same command on all workers (`tpu-vm ssh --worker=all`): `python -m launch.local` over the
   sweep, one point at a time; each point is one `jax.distributed` job over the whole pod (jax
   finds the workers itself, `rmjax.parallel.initialize_from_env`). Each worker writes its log
   to `~/rmjax_logs/<run>/<hostname>.log`.
4. The logs are copied back to `LOGS/<run>/` here (`--logs`, default `tpu_logs`), one file per worker.

DIR is a path on the workers (the same on each; a bucket mounted there or a local disk).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from launch import local

REMOTE_DIR = '~/rmjax'
REMOTE_LOGS = '~/rmjax_logs'


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog='python -m launch.tpu',
      description='Create or reuse a TPU VM, install this code on every worker and run a sweep on all workers '
                  '(gcloud compute tpus tpu-vm ssh --worker=all), with a log per worker. Extra --config.a.b=v '
                  'flags apply to every point.')
  parser.add_argument('--tpu', required=True, help='TPU VM name')
  parser.add_argument('--zone', required=True, help='e.g. us-central2-b')
  parser.add_argument('--config', required=True, help='config file (relative to the repository) and argument')
  parser.add_argument('--workdir', required=True, help='sweep directory on the workers')
  parser.add_argument('--project', default='', help='GCP project (default: gcloud\'s)')
  parser.add_argument('--accelerator_type', default='v4-8', help='for a new TPU VM, e.g. v4-32, v5litepod-16')
  parser.add_argument('--version', default='tpu-ubuntu2204-base', help='TPU VM software version of a new VM')
  parser.add_argument('--spot', action='store_true', help='create a spot (preemptible) TPU VM')
  parser.add_argument('--run', default='', help='name of this run\'s logs (default: a timestamp)')
  parser.add_argument('--logs', default='tpu_logs', help='local folder for the workers\' logs (LOGS/<run>/)')
  parser.add_argument('--dry-run', action='store_true', help='print the gcloud commands without running any')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognized arguments {bad}; only --config.a.b=v overrides may follow.')
  return args, rest


def _gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={args.zone}']
  return cmd + ([f'--project={args.project}'] if args.project else [])


def commands(args: argparse.Namespace, fixed: Sequence[str], tarball: str, run: str) -> dict[str, list[str]]:
  """Every gcloud command of a launch, by step name."""
  remote_logs = f'{REMOTE_LOGS}/{run}'
  sweep_cmd = ' '.join(shlex.quote(a) for a in ['python3', '-m', 'launch.local', f'--config={args.config}',
                                                f'--workdir={args.workdir}', '--parallel=1', *fixed])
  install = (f'mkdir -p {REMOTE_DIR} && tar xzf ~/rmjax.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && '
             'python3 -m pip install -q -e . "jax[tpu]"')
  start = (f'mkdir -p {remote_logs} && cd {REMOTE_DIR} && {sweep_cmd} > {remote_logs}/$(hostname).log 2>&1; '
           f'status=$?; tail -n 5 {remote_logs}/$(hostname).log; exit $status')
  create = ['create', args.tpu, f'--accelerator-type={args.accelerator_type}', f'--version={args.version}']
  return {
      'describe': _gcloud(args, 'describe', args.tpu),
      'create': _gcloud(args, *create, *(['--spot'] if args.spot else [])),
      'copy': _gcloud(args, 'scp', tarball, f'{args.tpu}:~/rmjax.tar.gz', '--worker=all'),
      'install': _gcloud(args, 'ssh', args.tpu, '--worker=all', f'--command={install}'),
      'run': _gcloud(args, 'ssh', args.tpu, '--worker=all', f'--command={start}'),
      'logs': _gcloud(args, 'scp', '--recurse', f'{args.tpu}:{remote_logs}/*',
                      str(pathlib.Path(args.logs) / run), '--worker=all'),
  }


def _show(cmd: Sequence[str]) -> None:
  print('+ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  args, fixed = parse_args(sys.argv[1:] if argv is None else argv)
  run = args.run or datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  with tempfile.TemporaryDirectory() as tmp:
    tarball = str(pathlib.Path(tmp) / 'rmjax.tar.gz')
    archive = ['git', '-C', str(local.ROOT), 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD']
    cmds = commands(args, fixed, tarball, run)
    if args.dry_run:
      for step in ('describe', 'create'):
        _show(cmds[step])
      print('# (create only when describe fails)')
      for cmd in (archive, cmds['copy'], cmds['install'], cmds['run'], cmds['logs']):
        _show(cmd)
      return 0
    _show(cmds['describe'])
    if subprocess.run(cmds['describe'], stdout=subprocess.DEVNULL, check=False).returncode != 0:
      _show(cmds['create'])
      subprocess.run(cmds['create'], check=True)
    for cmd in (archive, cmds['copy'], cmds['install']):
      _show(cmd)
      subprocess.run(cmd, check=True)
    _show(cmds['run'])
    status = subprocess.run(cmds['run'], check=False).returncode
    (pathlib.Path(args.logs) / run).mkdir(parents=True, exist_ok=True)
    _show(cmds['logs'])
    subprocess.run(cmds['logs'], check=False)
  print(f'sweep exit status {status}; logs per worker in {pathlib.Path(args.logs) / run}')
  return status


if __name__ == '__main__':
  sys.exit(main())
