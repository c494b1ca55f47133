"""All 8-device checks in one process (run by test_multidevice.py with 8 forced CPU devices).

Prints one JSON object with, for each `data x fsdp x tensor` mesh: the RM step's losses (three
steps, the third after the state of step 2 was saved on the 2x4x1 mesh and restored onto this
one), whether the restored arrays equal the saved ones, and the largest share of the parameter
bytes any one device holds; the same for one device; greedy samples on one device and on the
meshes; and the per-device parameter bytes of the `small` LM on several 8-device meshes
(from the shardings alone, nothing allocated); the RM step with scanned, rematerialized layers
and gradient accumulation on the meshes; and one PPO iteration (policy, value model and a
2-member reward model all sharded) on one device and on the meshes: its metrics, sampled tokens,
updated parameters and the policy's largest per-device byte share; the same for a population
of 2 PPO runs; and two DPO steps, alone and as a population of 2, in 2 microbatches on the meshes.
"""
import json
import os
import pathlib
import sys
import tempfile

assert 'jax' not in sys.modules
# 8 device threads share 2 cores: a collective's participants can arrive far apart, and XLA:CPU
# aborts a collective that waits longer than 40 s by default.
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + (
    ' --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=540'
    ' --xla_cpu_collective_timeout_seconds=540')
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import optax  # noqa: E402

from rmjax import objectives, parallel  # noqa: E402
from rmjax.data import ByteTokenizer, PairBatches  # noqa: E402
from rmjax.models import partitioning, sampling, transformer  # noqa: E402
from rmjax.models.config import get_size  # noqa: E402
from rmjax.rl import dpo  # noqa: E402
from rmjax.train import checkpoint  # noqa: E402
from rmjax.train import state as state_lib  # noqa: E402

import rl_case  # noqa: E402
import rm_case  # noqa: E402

MESHES = ((2, 4, 1), (1, 4, 2))


def rm_runs(ckpt_dir):
  """Losses of steps 1, 2 on each mesh, then step 3 from the 2x4x1 mesh's saved step 2."""
  out = {}
  single = rm_case.Case(parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state, losses = single.run(single.fresh(), 3)
  out['single'] = {'losses': losses, 'max_share': rm_case.param_share(state.params)[0]}
  saved = None
  for shape in MESHES:
    case = rm_case.Case(parallel.make_mesh(*shape))
    state, losses = case.run(case.fresh(), 2)
    if saved is None:
      with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(2, state, {})
      saved = [np.asarray(x) for x in jax.tree.leaves(state)]
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
      restored, _, _ = ckpt.restore(case.target)
    equal = all(np.array_equal(a, np.asarray(b)) for a, b in zip(saved, jax.tree.leaves(restored)))
    placed = jax.tree.map(lambda x: x.sharding, restored) == case.shardings
    share, ndev = rm_case.param_share(restored.params)
    _, more = case.run(restored, 1)
    out['x'.join(map(str, shape))] = {'losses': losses + more, 'restored_equal': equal, 'restored_placed': placed,
                                      'max_share': share, 'devices': ndev}
  return out


def scaled_rm_runs():
  """Losses of three RM steps with scanned, rematerialized layers and 2 accumulation steps, per mesh."""
  out = {}
  for shape in MESHES:
    case = rm_case.Case(parallel.make_mesh(*shape), scan_layers=True, remat='block', grad_accum_steps=2)
    state, losses = case.run(case.fresh(), 3)
    out['x'.join(map(str, shape))] = {'losses': losses, 'max_share': rm_case.param_share(state.params)[0]}
  return out


def sample_runs():
  """Greedy samples of a `tiny` LM: one device vs the meshes (params and prompts sharded)."""
  cfg = get_size('tiny')
  params = transformer.init_lm(jax.random.key(1), cfg)
  rng = np.random.default_rng(0)
  lens = rng.integers(3, 9, 16)
  mask = np.arange(8)[None] >= (8 - lens)[:, None]
  tokens = np.where(mask, rng.integers(3, 512, (16, 8)), 0).astype(np.int32)
  fn = jax.jit(lambda p, t, m: sampling.sample(p, cfg, t, m, jax.random.key(0), max_new_tokens=8,
                                               temperature=0.0))
  out = {'single': np.asarray(fn(params, tokens, mask).tokens).tolist()}
  for shape in ((2, 4, 1), (1, 4, 2)):
    mesh = parallel.make_mesh(*shape)
    placed = jax.device_put(params, parallel.tree_shardings(params, partitioning.logical_axes(params), mesh))
    batch = parallel.global_batch({'t': tokens, 'm': mask}, mesh)
    out['x'.join(map(str, shape))] = np.asarray(fn(placed, batch['t'], batch['m']).tokens).tolist()
  return out


def small_param_bytes():
  """Per-device parameter bytes of the `small` LM on 8 devices, from the shardings alone."""
  cfg = get_size('small')
  abstract = jax.eval_shape(lambda: transformer.init_lm(jax.random.key(0), cfg))
  axes = partitioning.logical_axes(abstract)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  out = {'total': total}
  for shape in ((8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2), (1, 1, 8)):
    mesh = parallel.make_mesh(*shape)
    shardings = parallel.tree_shardings(abstract, axes, mesh)
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                     for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
    out['x'.join(map(str, shape))] = per_device
  return out


def rl_runs():
  """One PPO iteration (`rl_case`) on one device and on the meshes."""
  out = {}
  for shape in ((1, 1, 1), (2, 4, 1), (1, 4, 2)):
    case = rl_case.Case(parallel.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))]))
    state, metrics, tokens = case.run(case.fresh())
    out['x'.join(map(str, shape))] = {
        'metrics': metrics, 'tokens': np.asarray(tokens).tolist(),
        'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
        'policy_share': rm_case.param_share(state.params['policy'])[0]}
  return out


def rl_population_runs():
  """One PPO iteration of a population of 2 (`rl_case.PopulationCase`) on one device and on the meshes."""
  out = {}
  for shape in ((1, 1, 1),) + MESHES:
    case = rl_case.PopulationCase(parallel.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))]))
    state, metrics, tokens = case.run()
    out['x'.join(map(str, shape))] = {
        'metrics': metrics, 'tokens': np.asarray(tokens).tolist(),
        'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.members.params)],
        'policy_share': rm_case.param_share(state.members.params['policy'])[0]}
  return out


def dpo_runs():
  """Two DPO steps of a `tiny` policy (SGD, batches of 16 pairs of 32 tokens, the second with 4
  padding rows), alone and as a population of 2 (β 0.05 and 0.5, each member its own initial
  policy and pair order, one shared reference): plainly on one device, in 2 microbatches on the
  meshes."""
  cfg = get_size('tiny')
  ref = transformer.init_lm(jax.random.key(0), cfg)
  # Host copies: a device_put onto the device they live on would alias them, and the steps donate.
  policies = [jax.device_get(transformer.init_lm(jax.random.key(k), cfg)) for k in (5, 6)]
  pairs = PairBatches(dpo.toy_pairs(28, seed=0, letter='e', grammar_seed=0), ByteTokenizer(), seq_len=32,
                      global_batch_size=16, seed=0, drop_remainder=False)
  batches = [pairs[0], pairs[1]]
  section = {'preference_loss': 'dpo', 'dpo': {'beta': 0.1, 'label_smoothing': 0.0}}
  values = {'objective.dpo.beta': np.asarray([0.05, 0.5], np.float32)}
  optimizer = optax.sgd(0.5)
  loss_fn = objectives.build(section).preference_loss
  out = {}
  for shape in ((1, 1, 1),) + MESHES:
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    accum = 1 if shape == (1, 1, 1) else 2
    placed_ref = state_lib.place_params(ref, mesh)
    single = state_lib.create(policies[0], optimizer, jax.random.key(1))
    shardings = state_lib.state_shardings(single, optimizer, mesh)
    state = jax.device_put(single, shardings)
    step = dpo.make_train_step(cfg, loss_fn, optimizer, grad_accum_steps=accum, state_shardings=shardings)
    single_metrics = []
    for b in batches:
      state, m = step(state, placed_ref, parallel.global_batch(b, mesh))
      single_metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[state_lib.create(p, optimizer, jax.random.key(1))
                                                        for p in policies])
    pshardings = state_lib.state_shardings(stacked, optimizer, mesh, population=True)
    states = jax.device_put(stacked, pshardings)
    pop_step, _ = dpo.population_functions(cfg, section, optimizer, ref_axis=None, grad_accum_steps=accum)
    pop_step = jax.jit(pop_step, donate_argnums=(0,), out_shardings=(pshardings, None))
    pop_metrics = []
    for s in range(2):
      member_rows = {k: np.stack([batches[s][k], batches[1 - s][k]], axis=1) for k in batches[s]}
      states, m = pop_step(states, placed_ref, values, parallel.global_batch(member_rows, mesh))
      pop_metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    out['x'.join(map(str, shape))] = {
        'single': single_metrics, 'population': pop_metrics,
        'single_params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
        'population_params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(states.params)],
        'single_share': rm_case.param_share(state.params)[0], 'population_share': rm_case.param_share(states.params)[0]}
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  with tempfile.TemporaryDirectory() as tmp:
    out = {'rm': rm_runs(pathlib.Path(tmp) / 'checkpoints')}
  out['rm_scaled'] = scaled_rm_runs()
  out['samples'] = sample_runs()
  out['small_param_bytes'] = small_param_bytes()
  out['rl'] = rl_runs()
  out['rl_population'] = rl_population_runs()
  out['dpo'] = dpo_runs()
  print(json.dumps(out))


if __name__ == '__main__':
  main()
