"""Jobs that need no real model, for runner tests: `y = x**2`, or a failure when `config.fail`;
with `config.train.steps > 0`, a counter `total += x` stepped by the real training loop
(checkpoints, SIGTERM -> checkpoint and exit, resume), each step `config.step_seconds` long."""
import json
import pathlib
import time

import ml_collections

from rmjax import config as config_lib


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  train = config_lib.train(0, log_every=1, checkpoint_every=2)
  train.progress = False
  return ml_collections.ConfigDict(dict(job='tests.launch.toy_job:run', x=1.0, fail=False, metrics_only=False,
                                        train=train, step_seconds=0.1))


def run(config, workdir: str):
  if config.fail:
    raise RuntimeError(f'toy failure at x={config.x}')
  if config.train.steps > 0:
    return _count(config, workdir)
  if config.metrics_only:  # no return value: the runner reads the last metrics.jsonl record
    (pathlib.Path(workdir) / 'metrics.jsonl').write_text(
        json.dumps({'step': 1, 'y': 0.0}) + '\n' + json.dumps({'step': 2, 'y': config.x ** 3}) + '\n')
    return None
  return {'y': config.x ** 2}


def _count(config, workdir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from rmjax import parallel  # pylint: disable=import-outside-toplevel
  from rmjax.train import loop  # pylint: disable=import-outside-toplevel

  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rep = parallel.replicated(mesh)

  def step(state, batch):
    del batch
    time.sleep(config.step_seconds)
    return {'total': state['total'] + config.x}, {'loss': state['total']}

  state, _ = loop.run(
      workdir=pathlib.Path(workdir) / 'count', loop=loop.LoopConfig.from_config(config.train, desc='count'),
      train_step=step, init_state=lambda: {'total': jax.device_put(jnp.zeros((), jnp.float32), rep)},
      abstract_state={'total': jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)},
      batches=[{} for _ in range(config.train.steps)], mesh=mesh, metadata=lambda s: {})
  return {'total': float(state['total'])}
