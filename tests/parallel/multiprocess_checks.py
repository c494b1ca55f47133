"""The RM step across two `jax.distributed` processes (run by test_multiprocess.py).

`python multiprocess_checks.py worker DIR` with `RMJAX_COORDINATOR_ADDRESS`, `RMJAX_NUM_PROCESSES=2`
and `RMJAX_PROCESS_ID` set: 4 CPU devices per process, an 8-device `data x fsdp = 2 x 4` mesh;
two RM steps, a checkpoint of step 2 (each process writes its shards), a restore of it into a
fresh target, one more step. Process 0 writes `DIR/worker.json` (losses) and `DIR/worker.npz`
(the final parameters, gathered) and `DIR/saved.npz` (the saved ones).

`python multiprocess_checks.py single DIR`: the same three steps in one process on one device,
and the workers' step-2 checkpoint restored onto that one device (compared with the
parameters they saved, `DIR/saved.npz`); writes `DIR/single.json` and
`DIR/single.npz`.
"""
import json
import os
import pathlib
import sys

assert 'jax' not in sys.modules
ROLE, OUT = sys.argv[1], pathlib.Path(sys.argv[2])
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + (
    ' --xla_force_host_platform_device_count=4' if ROLE == 'worker' else '')
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from rmjax import parallel  # noqa: E402
from rmjax.train import checkpoint  # noqa: E402

import rm_case  # noqa: E402


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def worker():
  group = parallel.initialize_from_env()
  assert group.source == 'explicit' and jax.process_count() == 2 and jax.device_count() == 8, group
  pid = jax.process_index()
  case = rm_case.Case(parallel.make_mesh(2, 4))
  state, losses = case.run(case.fresh(), 2, pid, 2)
  saved = multihost_utils.process_allgather(state.params, tiled=True)
  with checkpoint.Checkpointer(OUT / 'checkpoints') as ckpt:
    ckpt.save(2, state, {'note': 'two processes'})
  with checkpoint.Checkpointer(OUT / 'checkpoints') as ckpt:
    restored, meta, step = ckpt.restore(case.target)
  assert step == 2 and meta['note'] == 'two processes'
  same = all(np.array_equal(a.data, b.data) for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored))
             for a, b in zip(x.addressable_shards, y.addressable_shards))
  restored_shardings = jax.tree.map(lambda x: x.sharding, restored)
  share = rm_case.param_share(restored.params)[0]
  state, more = case.run(restored, 1, pid, 2)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if pid == 0:
    (OUT / 'worker.json').write_text(json.dumps({
        'losses': losses + more, 'restored_equal': bool(same),
        'restored_sharded_as_target': restored_shardings == case.shardings,
        'share': share}))
    np.savez(OUT / 'worker.npz', **flat(params))
    np.savez(OUT / 'saved.npz', **flat(saved))
  multihost_utils.sync_global_devices('done')


def single():
  case = rm_case.Case(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
  state, losses = case.run(case.fresh(), 2)
  with checkpoint.Checkpointer(OUT / 'checkpoints') as ckpt:
    restored, _, _ = ckpt.restore(case.target)  # saved by the two processes on 8 devices
  saved = np.load(OUT / 'saved.npz')
  restored_equal = all(np.array_equal(saved[k], v) for k, v in flat(restored.params).items())
  state, more = case.run(state, 1)
  (OUT / 'single.json').write_text(json.dumps({'losses': losses + more, 'restored_equal': bool(restored_equal),
                                           'restored_sharding': str(jax.tree.leaves(restored.params)[0].sharding)}))
  np.savez(OUT / 'single.npz', **flat(state.params))


if __name__ == '__main__':
  {'worker': worker, 'single': single}[ROLE]()
