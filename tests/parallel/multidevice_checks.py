"""All 8-device checks in one process (run by test_multidevice.py with 8 forced CPU devices).

Prints one JSON object: for each mesh, the RM step's loss and the single-device loss, and the
largest share of the parameter bytes any one device holds.
"""
import json
import os
import sys

assert 'jax' not in sys.modules
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rmjax import config as C  # noqa: E402
from rmjax import objectives, parallel  # noqa: E402
from rmjax.models import partitioning  # noqa: E402
from rmjax.models.config import get_size  # noqa: E402
from rmjax.models.reward_model import RewardModel  # noqa: E402
from rmjax.train import optim, rm_trainer  # noqa: E402
from rmjax.train import state as state_lib  # noqa: E402


def batch(b=16, t=32, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(8, t + 1, (2, b))
  masks = [np.arange(t)[None] < lens[i][:, None] for i in range(2)]
  return dict(chosen_tokens=np.where(masks[0], rng.integers(3, 512, (b, t)), 0).astype(np.int32),
              rejected_tokens=np.where(masks[1], rng.integers(3, 512, (b, t)), 0).astype(np.int32),
              chosen_mask=masks[0], rejected_mask=masks[1], weight=np.ones(b, np.float32),
              index=np.arange(b, dtype=np.int64))


def rm_run(mesh, steps=2):
  rm = RewardModel(get_size('tiny'), num_members=2, kind='full')
  opt = rm_trainer.per_member(optim.make_optimizer(C.optim(lr=1e-2, warmup_steps=0), 10))
  init = lambda rng: state_lib.create(rm.init(rng), opt, rng)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.shardings(abstract, partitioning.logical_axes(abstract.params), opt, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  step = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), state_shardings=shardings)
  losses = []
  for s in range(steps):
    state, m = step(state, parallel.global_batch(batch(seed=s), mesh))
    losses.append(float(m['loss']))
  total = sum(x.nbytes for x in jax.tree.leaves(state.params))
  per_device = {}
  for x in jax.tree.leaves(state.params):
    for shard in x.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return losses, max(per_device.values()) / total, len(per_device)


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {}
  single, share1, _ = rm_run(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
  out['single'] = {'losses': single, 'max_share': share1}
  for data, fsdp in ((2, 4), (1, 8), (8, 1)):
    losses, share, ndev = rm_run(parallel.make_mesh(data, fsdp))
    out[f'{data}x{fsdp}'] = {'losses': losses, 'max_share': share, 'devices': ndev}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
