"""One sweep point: `python -m launch.point --config=configs/x.py:arg --workdir=DIR [--overrides=JSON]`.

Runs the job of `config.job` exactly as `python -m rmjax.main` does (the same `--config` and
`--config.a.b=v` flags), with the point's overrides (a JSON dict of dotted keys) applied on
top, and writes `DIR/result.json` (the point's final metrics, see `final_metrics`) when the
job returns: the marker the launchers use to skip finished points. A run stopped by SIGTERM /
SIGUSR2 after writing its checkpoint exits with `PREEMPTED_EXIT_CODE` (75). `jax.distributed` is
initialised first from the environment (`rmjax.parallel.initialize_from_env`: SLURM, submitit,
a TPU pod, or `RMJAX_COORDINATOR_ADDRESS` ...). A rerun in the same
workdir resumes the job from its own checkpoints. Every process writes the (same) result; with
`--lock` (the default) the process holds an exclusive lock on `DIR/.lock` while it runs, so a
restarted runner's new process waits for a dying old one to finish writing its checkpoint.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
from absl import app, flags
from absl import logging as absl_logging

from rmjax import config as config_lib
from rmjax import main as rmjax_main  # defines the --config and --workdir flags
from rmjax import parallel
from rmjax.train import loop

from launch import sweep

RESULT_FILE = 'result.json'
LOCK_FILE = '.lock'
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a signal stopped the job after a checkpoint; rerun to resume

_OVERRIDES = flags.DEFINE_string('overrides', '{}', 'JSON dict of dotted config keys -> values for this point.')
_LOCK = flags.DEFINE_bool('lock', True, 'Hold an exclusive lock on WORKDIR/.lock while running.')


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _last_record(workdir: pathlib.Path) -> dict[str, float]:
  files = sorted(workdir.rglob('metrics.jsonl'), key=lambda p: (len(p.relative_to(workdir).parts), str(p)))
  for path in files:
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if lines:
      try:
        return {k: v for k, v in json.loads(lines[-1]).items() if _is_number(v)}
      except json.JSONDecodeError:
        continue
  return {}


def final_metrics(result: Any, workdir: str | os.PathLike) -> dict[str, float]:
  """The point's final metrics.

  The job's return value when it is a non-empty dict of numbers (e.g. `rm_world`'s eval
  metrics); else the last record of the shallowest `metrics.jsonl` under `workdir`; else `{}`.
  """
  if isinstance(result, Mapping) and result and all(_is_number(v) for v in result.values()):
    return {str(k): float(v) for k, v in result.items()}
  return _last_record(pathlib.Path(workdir))


def read_result(workdir: str | os.PathLike) -> dict[str, float] | None:
  """The metrics in `workdir/result.json`, or None when the point has not finished."""
  path = pathlib.Path(workdir) / RESULT_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True))
  os.replace(tmp, path)


def run_point(config, workdir: str | os.PathLike, *, write_result: bool = True) -> dict[str, float]:
  """Runs `config.job(config, workdir)` and returns (and with `write_result` saves) its final metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  job = rmjax_main.resolve_job(config.job)
  metrics = final_metrics(job(config, str(workdir)), workdir)
  metrics = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
  if write_result:
    _write_json(workdir / RESULT_FILE, metrics)
  return metrics


@contextlib.contextmanager
def exclusive_lock(path: pathlib.Path):
  """Holds `flock(LOCK_EX)` on `path` (blocking until it is free) inside the block."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  parallel.initialize_from_env()  # multi-host jobs: before anything touches a device
  try:
    overrides = json.loads(_OVERRIDES.value)
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f'--overrides is not valid JSON ({e}): {_OVERRIDES.value!r}') from e
  config = sweep.apply_overrides(flags.FLAGS.config, overrides)
  workdir = pathlib.Path(flags.FLAGS.workdir)
  lock = exclusive_lock(workdir / LOCK_FILE) if _LOCK.value else contextlib.nullcontext()
  with lock:
    # Every process writes the same result (atomically): on a pod each worker has its own disk.
    metrics = run_point(config, workdir)
  print(json.dumps({'result': metrics, 'process_index': jax.process_index()}, sort_keys=True))


def run() -> None:
  try:
    app.run(main)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  except loop.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  run()
