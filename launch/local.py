"""Local sweep runner: every point of a config's `get_sweep()` in its own process.

  python -m launch.local --config=configs/sweeps/rm_lr.py:test --workdir=DIR [--parallel N] [--config.a.b=v ...]

Point i runs `python -m launch.point` in `DIR/<point name>/` (named from its overrides,
`launch.sweep.point_name`), with its output in `DIR/<point name>/log.txt`; `--config.a.b=v`
flags apply to every point. A point whose `result.json` exists is finished and skipped; any
other point is (re)started, and its job resumes from its own checkpoints. `DIR/sweep.jsonl`
holds one line per point (name, overrides, status, exit code, final metrics, seconds, pid) and is
rewritten at every change; at the end `DIR/sweep.md` holds the aggregated table, which is
also printed. A failing point is reported and the others go on; the exit code is 1 if any
point failed.

Stopping: SIGINT / SIGTERM to the runner send SIGTERM to the running points (each writes a
checkpoint and exits) and the runner exits after them; if the runner is killed outright, the
kernel sends the points SIGTERM (`PR_SET_PDEATHSIG`). Rerun the same command to go on.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tqdm

from rmjax import config as config_lib

from launch import point as point_lib
from launch import sweep

SWEEP_FILE = 'sweep.jsonl'
TABLE_FILE = 'sweep.md'
LOG_FILE = 'log.txt'
_PR_SET_PDEATHSIG = 1
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Point:
  """One sweep point and where it stands."""
  name: str
  overrides: dict[str, Any]
  status: str = 'pending'  # pending | running | done | failed | interrupted
  returncode: int | None = None
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float | None = None
  pid: int | None = None

  def record(self, workdir: pathlib.Path) -> dict[str, Any]:
    return dict(name=self.name, overrides=self.overrides, status=self.status, returncode=self.returncode,
                metrics=self.metrics, seconds=self.seconds, pid=self.pid, workdir=str(workdir / self.name),
                log=str(workdir / self.name / LOG_FILE))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """`(args, fixed)`: the runner's flags and the `--config.a.b=v` flags for every point."""
  parser = argparse.ArgumentParser(
      prog='python -m launch.local',
      description='Run every point of a config\'s get_sweep() in its own process and sub-workdir; finished '
                  'points are skipped, interrupted ones resume from their checkpoints. Extra '
                  '--config.a.b=v flags apply to every point.')
  parser.add_argument('--config', required=True, help='config file and argument, e.g. configs/sweeps/rm_lr.py:test')
  parser.add_argument('--workdir', required=True, help='sweep directory; point i runs in WORKDIR/<point name>')
  parser.add_argument('--parallel', type=int, default=1, help='points run at the same time (default 1)')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognized arguments {bad}; only --config.a.b=v overrides may follow.')
  if args.parallel < 1:
    parser.error(f'--parallel={args.parallel}: expected a positive number of processes.')
  return args, rest


def prepare(spec: str, fixed: Sequence[str]) -> list[Point]:
  """The sweep's points, each checked against the config (keys, types) before anything runs."""
  config = config_lib.load_config_file(spec)
  config_lib.check_override_keys(config, fixed)
  fixed_keys = {a[len('--config.'):].partition('=')[0] for a in fixed}
  points = sweep.load_sweep(spec)
  for overrides in points:
    both = sorted(fixed_keys & overrides.keys())
    if both:
      raise config_lib.ConfigError(f'{both} are swept by {spec} and also set by --config flags; set each once.')
    sweep.apply_overrides(config, overrides)
  return [Point(name, p) for name, p in zip(sweep.unique_names(points), points)]


def _die_with_parent(parent: int) -> None:
  """In the child before exec: SIGTERM when the runner dies (Linux), so no point outlives it."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != parent:  # the runner died before prctl
    os.kill(os.getpid(), signal.SIGTERM)


def point_command(spec: str, workdir: pathlib.Path, p: Point, fixed: Sequence[str]) -> list[str]:
  return [sys.executable, '-m', 'launch.point', f'--config={spec}', f'--workdir={workdir / p.name}',
          f'--overrides={json.dumps(p.overrides, sort_keys=True)}', *fixed]


# glibc's malloc asking the kernel for transparent huge pages (a tunable read when a process starts):
# XLA:CPU maps its temporary buffers afresh at every call and faults in each 4 KiB page; with this
# `small` training steps ran 5-16% faster on CPU (docs/benchmarks.md, item 11).
HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def point_env(environ: Mapping[str, str]) -> dict[str, str]:
  """A point's environment: `environ` with the repository first on PYTHONPATH and `HUGE_PAGES` among
  GLIBC_TUNABLES (kept where already set; glibc ignores it where unsupported)."""
  env = dict(environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), environ.get('PYTHONPATH')])))
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  if not any(t.startswith('glibc.malloc.hugetlb=') for t in tunables):
    env['GLIBC_TUNABLES'] = ':'.join(tunables + [HUGE_PAGES])
  return env


def _start(cmd: list[str], log_path: pathlib.Path) -> subprocess.Popen:
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = point_env(os.environ)
  with open(log_path, 'a') as log:
    log.write(f'\n=== launch.local start {time.strftime("%Y-%m-%d %H:%M:%S")}: {" ".join(cmd)}\n')
    log.flush()
    parent = os.getpid()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=lambda: _die_with_parent(parent))


def _tail(path: pathlib.Path, lines: int = 15) -> str:
  try:
    return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
  except OSError:
    return ''


def write_records(workdir: pathlib.Path, points: Sequence[Point]) -> None:
  """`sweep.jsonl`, one line per point, replaced atomically."""
  tmp = workdir / (SWEEP_FILE + '.tmp')
  tmp.write_text(''.join(json.dumps(p.record(workdir), sort_keys=True) + '\n' for p in points))
  os.replace(tmp, workdir / SWEEP_FILE)


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return '' if v is None else str(v)


def table(points: Sequence[Point]) -> str:
  """A markdown table: one row per point; columns: point, each swept key, status, each metric."""
  keys = sorted({k for p in points for k in p.overrides})
  metrics = sorted({k for p in points for k in p.metrics})
  header = ['point', *keys, 'status', *metrics]
  rows = [[p.name, *[sweep.value_text(p.overrides[k]) if k in p.overrides else "" for k in keys], p.status, *[_cell(p.metrics.get(m)) for m in metrics]]
          for p in points]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows]) + '\n'


def run_sweep(spec: str, workdir: str | os.PathLike, *, parallel: int = 1, fixed: Sequence[str] = (),
              progress: bool = True) -> list[Point]:
  """Runs the unfinished points of `spec`'s sweep, `parallel` at a time; returns every point's state."""
  config_file, _, arg = spec.partition(':')
  spec = f'{pathlib.Path(config_file).resolve()}' + (f':{arg}' if arg else '')
  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  points = prepare(spec, fixed)
  for p in points:
    result = point_lib.read_result(workdir / p.name)
    if result is not None:
      p.status, p.metrics = 'done', result
  queue = [p for p in points if p.status != 'done']
  running: dict[str, tuple[Point, subprocess.Popen, float]] = {}
  stop = {'signal': None}

  def on_signal(signum, _frame):
    stop['signal'] = signum

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  bar = tqdm.tqdm(total=len(points), initial=len(points) - len(queue), desc='sweep', unit='point',
                  disable=not progress, dynamic_ncols=True)
  write_records(workdir, points)
  shown = None
  try:
    while queue or running:
      while queue and len(running) < parallel and stop['signal'] is None:
        p = queue.pop(0)
        p.status = 'running'
        proc = _start(point_command(spec, workdir, p, fixed), workdir / p.name / LOG_FILE)
        p.pid = proc.pid
        running[p.name] = (p, proc, time.perf_counter())
        write_records(workdir, points)
      if stop['signal'] is not None:
        for _, proc, _ in running.values():
          if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        queue.clear()
      for name, (p, proc, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del running[name]
        p.returncode, p.seconds = rc, round(time.perf_counter() - t0, 2)
        result = point_lib.read_result(workdir / p.name) if rc == 0 else None
        if result is not None:
          p.status, p.metrics = 'done', result
          bar.update(1)
        elif stop['signal'] is not None:
          p.status = 'interrupted'
        else:
          p.status = 'failed'
          log_path = workdir / p.name / LOG_FILE
          tqdm.tqdm.write(f'point {p.name} failed (exit code {rc}); log: {log_path}\n{_tail(log_path)}',
                          file=sys.stderr)
        write_records(workdir, points)
      postfix = dict(running=len(running), failed=sum(p.status == 'failed' for p in points))
      if postfix != shown:
        bar.set_postfix(postfix)
        shown = postfix
      time.sleep(0.2)
  finally:
    bar.close()
    for s, h in old.items():
      signal.signal(s, h)
  for p in points:
    if p.status in ('pending', 'running'):
      p.status = 'interrupted'
  write_records(workdir, points)
  (workdir / TABLE_FILE).write_text(table(points))
  return points


def main(argv: Sequence[str] | None = None) -> int:
  args, fixed = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    points = run_sweep(args.config, args.workdir, parallel=args.parallel, fixed=fixed)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(table(points))
  counts = {s: sum(p.status == s for p in points) for s in ('done', 'failed', 'interrupted')}
  print(f'{counts["done"]}/{len(points)} points done, {counts["failed"]} failed, {counts["interrupted"]} interrupted; '
        f'{pathlib.Path(args.workdir) / SWEEP_FILE}')
  return 0 if counts['done'] == len(points) else 1


if __name__ == '__main__':
  sys.exit(main())
