"""Command line entry point: `python -m rmjax.main --config=configs/x.py:arg --workdir=DIR [--config.a.b=v]`.

Parses flags, validates the config before anything compiles, and calls the job named by
`config.job` (`'module:function'`, called as `function(config, workdir)`).
"""
from __future__ import annotations

import importlib
import inspect
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rmjax import config as config_lib
from rmjax import parallel

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/rm.py:tiny.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, data, metrics and results.')
_REDO = flags.DEFINE_list('redo', [], 'Stages of a study to recompute, with everything that follows them.')
flags.mark_flags_as_required(['config', 'workdir'])


def resolve_job(job: str):
  """`'module:function'` -> the function."""
  module_name, _, fn_name = job.partition(':')
  if not fn_name:
    raise config_lib.ConfigError(f"config.job={job!r}: expected 'module:function'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise config_lib.ConfigError(f'config.job={job!r}: cannot import {module_name!r} ({e}).') from e
  if not hasattr(module, fn_name):
    raise config_lib.ConfigError(f'config.job={job!r}: {module_name} has no function {fn_name!r}.')
  return getattr(module, fn_name)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and TFDS log every file at INFO
  parallel.initialize_from_env()  # jax.distributed on a pod / SLURM / submitit; a no-op on one process
  config = _CONFIG.value
  job = resolve_job(config.job)
  if _REDO.value:
    if 'redo' not in inspect.signature(job).parameters:
      raise config_lib.ConfigError(f'--redo: the job {config.job} has no stages to redo.')
    job(config, _WORKDIR.value, redo=tuple(_REDO.value))
  else:
    job(config, _WORKDIR.value)


def _check_keys_early(argv) -> None:
  """Unknown `--config.x` keys get a message listing the valid keys, instead of a traceback."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return
  try:
    config_lib.check_override_keys(config_lib.load_config_file(spec), argv)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')


def run() -> None:
  _check_keys_early(sys.argv)
  try:
    app.run(main)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  run()
