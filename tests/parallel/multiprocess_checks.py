"""The RM step, a PPO iteration and a preempted training loop across two `jax.distributed`
processes (run by test_multiprocess.py).

`python multiprocess_checks.py worker DIR` with `RMJAX_COORDINATOR_ADDRESS`, `RMJAX_NUM_PROCESSES=2`
and `RMJAX_PROCESS_ID` set: 4 CPU devices per process, an 8-device `data x fsdp = 2 x 4` mesh.
- RM: two steps, a checkpoint of step 2 (each process writes its shards), a restore of it into
  a fresh target, one more step;
- RL: one PPO iteration (`rl_case`), a checkpoint, a restore, a second iteration;
- the training loop on the RM step, 40 steps: once through, and once where process 1 alone gets
  SIGUSR2 after step 3 — both processes must stop at the same step with one checkpoint, and the
  rerun must resume from it to bitwise the uninterrupted result.
Process 0 writes `DIR/worker.json`, `DIR/worker.npz` (the final RM and RL parameters, gathered)
and `DIR/saved.npz` (the saved RM ones).

`python multiprocess_checks.py single DIR`: the same RM steps and RL iterations in one process on
one device, and the workers' step-2 checkpoint restored onto that one device (compared with the
parameters they saved, `DIR/saved.npz`); writes `DIR/single.json` and `DIR/single.npz`.
"""
import json
import os
import pathlib
import signal
import sys
import time

assert 'jax' not in sys.modules
ROLE, OUT = sys.argv[1], pathlib.Path(sys.argv[2])
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + (
    ' --xla_force_host_platform_device_count=4' if ROLE == 'worker' else '')
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from rmjax import parallel  # noqa: E402
from rmjax.train import checkpoint, loop  # noqa: E402

import rl_case  # noqa: E402
import rm_case  # noqa: E402


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def rl_iterations(case, pid=0, count=1, ckpt_dir=None):
  """Two PPO iterations; with `ckpt_dir`, the second from a saved and restored state.

  Returns (final state, per-iteration metrics, per-iteration sampled tokens, restored == saved)."""
  state, m1, t1 = case.run(case.fresh(), pid, count)
  t1 = multihost_utils.process_allgather(t1, tiled=True)
  same = None
  if ckpt_dir is not None:
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      ckpt.save(1, state, {})
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      restored, _, _ = ckpt.restore(case.target)
    same = all(np.array_equal(a.data, b.data) for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored))
               for a, b in zip(x.addressable_shards, y.addressable_shards))
    state = restored
  state, m2, t2 = case.run(state, pid, count)
  t2 = multihost_utils.process_allgather(t2, tiled=True)
  return state, [m1, m2], [np.asarray(t1).tolist(), np.asarray(t2).tolist()], same


class LocalRows:
  """`batches[s]`: this process's rows of the RM case's batch s."""

  def __init__(self, pid, count):
    self.pid, self.count = pid, count

  def __getitem__(self, s):
    return rm_case.local_rows(rm_case.batch(seed=s), self.pid, self.count)


def preempted_loop(case, pid, workdir):
  """The loop on the RM step, 40 steps, with SIGUSR2 to process 1 alone after its step 3.

  Returns (the step each process stopped at, gathered; the resumed final parameters)."""
  sent = {'at': None}

  def step(state, batch):
    state, metrics = case.step(state, batch)
    if pid == 1 and sent['at'] is None and int(jax.device_get(state.step)) == 3:
      sent['at'] = 3
      os.kill(os.getpid(), signal.SIGUSR2)
    if sent['at'] is not None:
      time.sleep(0.1)  # the notice needs wall time to reach every process
    return state, metrics

  config = loop.LoopConfig(steps=40, log_every=0, checkpoint_every=0, progress=False)
  run = lambda train_step: loop.run(workdir=workdir, loop=config, train_step=train_step, init_state=case.fresh,
                                    abstract_state=case.target, batches=LocalRows(pid, 2), mesh=case.mesh,
                                    metadata=lambda _: {})
  stopped = -1
  try:
    run(step)
  except loop.Preempted:
    with checkpoint.Checkpointer(workdir / 'checkpoints') as ckpt:
      stopped = ckpt.latest_step()
  stopped_at = multihost_utils.process_allgather(np.int32(stopped)).tolist()
  state, _ = run(case.step)
  return stopped_at, state.params


def worker():
  group = parallel.initialize_from_env()
  assert group.source == 'explicit' and jax.process_count() == 2 and jax.device_count() == 8, group
  pid = jax.process_index()
  mesh = parallel.make_mesh(2, 4)
  rl_state, rl_metrics, rl_tokens, rl_restored_equal = rl_iterations(rl_case.Case(mesh), pid, 2,
                                                                     OUT / 'rl_checkpoints')
  rl_params = multihost_utils.process_allgather(rl_state.params, tiled=True)
  case = rm_case.Case(mesh)
  uninterrupted, _ = loop.run(workdir=OUT / 'loop_once', loop=loop.LoopConfig(steps=40, log_every=0,
                                                                               checkpoint_every=0, progress=False),
                              train_step=case.step, init_state=case.fresh, abstract_state=case.target,
                              batches=LocalRows(pid, 2), mesh=mesh, metadata=lambda _: {})
  stopped_at, resumed = preempted_loop(case, pid, OUT / 'loop_preempted')
  resumed_equal = all(np.array_equal(a.data, b.data)
                      for x, y in zip(jax.tree.leaves(uninterrupted.params), jax.tree.leaves(resumed))
                      for a, b in zip(x.addressable_shards, y.addressable_shards))
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
        'share': share, 'rl_metrics': rl_metrics, 'rl_tokens': rl_tokens,
        'rl_restored_equal': bool(rl_restored_equal), 'stopped_at': stopped_at,
        'resumed_equal': bool(resumed_equal)}))
    np.savez(OUT / 'worker.npz', **flat(params), **flat({'rl': rl_params}))
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
  rl_state, rl_metrics, rl_tokens, _ = rl_iterations(rl_case.Case(case.mesh))
  (OUT / 'single.json').write_text(json.dumps({'losses': losses + more, 'restored_equal': bool(restored_equal),
                                           'restored_sharding': str(jax.tree.leaves(restored.params)[0].sharding),
                                           'rl_metrics': rl_metrics, 'rl_tokens': rl_tokens}))
  np.savez(OUT / 'single.npz', **flat(state.params), **flat({'rl': rl_state.params}))


if __name__ == '__main__':
  {'worker': worker, 'single': single}[ROLE]()
