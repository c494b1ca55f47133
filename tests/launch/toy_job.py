"""A job that needs no compilation, for runner tests: `y = x**2`, or a failure when `config.fail`."""
import json
import pathlib

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  return ml_collections.ConfigDict(dict(job='tests.launch.toy_job:run', x=1.0, fail=False, metrics_only=False))


def run(config, workdir: str):
  if config.fail:
    raise RuntimeError(f'toy failure at x={config.x}')
  if config.metrics_only:  # no return value: the runner reads the last metrics.jsonl record
    (pathlib.Path(workdir) / 'metrics.jsonl').write_text(
        json.dumps({'step': 1, 'y': 0.0}) + '\n' + json.dumps({'step': 2, 'y': config.x ** 3}) + '\n')
    return None
  return {'y': config.x ** 2}
