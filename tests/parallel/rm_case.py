"""The RM-step case shared by the multi-device and multi-process checks (import after setting XLA_FLAGS).

A `tiny` reward-model ensemble of 2 full members, AdamW per member, Bradley–Terry on 16 pairs of
32 tokens; batch `s` is a pure function of `s`.
"""
import jax
import numpy as np

from rmjax import config as C
from rmjax import objectives, parallel
from rmjax.models import transformer
from rmjax.models.config import get_size
from rmjax.models.reward_model import RewardModel
from rmjax.train import optim, rm_trainer
from rmjax.train import state as state_lib

GLOBAL_BATCH = 16


def batch(b=GLOBAL_BATCH, t=32, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(8, t + 1, (2, b))
  masks = [np.arange(t)[None] < lens[i][:, None] for i in range(2)]
  return dict(chosen_tokens=np.where(masks[0], rng.integers(3, 512, (b, t)), 0).astype(np.int32),
              rejected_tokens=np.where(masks[1], rng.integers(3, 512, (b, t)), 0).astype(np.int32),
              chosen_mask=masks[0], rejected_mask=masks[1], weight=np.ones(b, np.float32),
              index=np.arange(b, dtype=np.int64))


def local_rows(global_batch, process_index, process_count):
  """This process's contiguous share of the rows (the devices of a mesh are ordered by process)."""
  n = GLOBAL_BATCH // process_count
  return {k: v[process_index * n:(process_index + 1) * n] for k, v in global_batch.items()}


class Case:
  """Model, optimizer, abstract state, shardings and the jitted step on `mesh`."""

  def __init__(self, mesh, rules=parallel.RULES, *, scan_layers=False, remat='none', grad_accum_steps=1):
    """The options change the program, not the start: a scanned model starts from the per-layer
    model's initial parameters, stacked (`transformer.stack_layers`)."""
    self.mesh = mesh
    self.rm = RewardModel(get_size('tiny', scan_layers=scan_layers, remat=remat), num_members=2, kind='full')
    self.opt = rm_trainer.per_member(optim.make_optimizer(C.optim(lr=1e-2, warmup_steps=0), 10))
    self.rng = jax.random.key(0)
    self.abstract = jax.eval_shape(self.init, self.rng)
    self.shardings = state_lib.state_shardings(self.abstract, self.opt, mesh, rules=rules)
    self.target = state_lib.with_shardings(self.abstract, self.shardings)
    self.step = rm_trainer.make_train_step(self.rm, self.opt, objectives.get('bradley_terry'),
                                           grad_accum_steps=grad_accum_steps, state_shardings=self.shardings)

  def init(self, rng):
    config = self.rm.config
    params = RewardModel(config.replace(scan_layers=False, remat='none'), 2, 'full').init(rng)
    if config.scan_layers:
      params = jax.vmap(lambda p: transformer.stack_layers(p, config.num_layers))(params)
    return state_lib.create(params, self.opt, rng)

  def fresh(self):
    return jax.jit(self.init, out_shardings=self.shardings)(self.rng)

  def run(self, state, steps, process_index=0, process_count=1):
    """Steps `state.step ..` of the schedule; returns (state, losses)."""
    losses = []
    for _ in range(steps):
      s = int(jax.device_get(state.step))
      local = local_rows(batch(seed=s), process_index, process_count)
      state, m = self.step(state, parallel.global_batch(local, self.mesh))
      losses.append(float(m['loss']))
    return state, losses


def param_share(params):
  """The largest share of the parameter bytes one device holds, and the number of devices."""
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  per_device = {}
  for x in jax.tree.leaves(params):
    for shard in x.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return max(per_device.values()) / total, len(per_device)
