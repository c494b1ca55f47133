"""Optimizers from config: AdamW (or Adam, SGD) with warmup + cosine decay and gradient clipping,
optionally on float32 master weights (`optim.master_dtype`, `with_master_weights`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmjax import config as config_lib

OPTIMIZERS = ('adamw', 'adam', 'sgd')
SCHEDULES = ('cosine', 'constant', 'linear')
MASTER_DTYPES = ('none', 'float32')


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps` to `lr`, then cosine / linear decay to `lr * final_lr_ratio`."""
  c = optim_config
  warmup = int(c.warmup_steps)
  if c.schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={c.schedule!r}: expected one of {SCHEDULES}.')
  if c.schedule == 'constant':
    decay = optax.constant_schedule(c.lr)
  else:
    steps = max(1, total_steps - warmup)
    end = c.lr * c.final_lr_ratio
    decay = (optax.cosine_decay_schedule(c.lr, steps, alpha=c.final_lr_ratio) if c.schedule == 'cosine'
             else optax.linear_schedule(c.lr, end, steps))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices (kernels, embeddings), not on norms and biases; the leading layer axis
  of a scanned backbone's leaves (under a `layers` key) does not count."""
  def decay(path, p):
    stacked = any(getattr(k, 'key', None) == 'layers' for k in path)
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(decay, params)


class MasterState(NamedTuple):
  """State of `with_master_weights`: the master copy of the parameters and the inner optimizer's state."""
  master: Any
  inner: Any


def with_master_weights(inner: optax.GradientTransformation, dtype: str = 'float32') -> optax.GradientTransformation:
  """`inner` run on a `dtype` (float32) master copy of the parameters kept in the optimizer state.

  Mixed precision for parameters stored in bfloat16 (`ModelConfig.param_dtype`): bf16 has 8
  significant bits, so an update smaller than half the spacing of a weight (|Δw| < 2^-9 |w|)
  rounds away and pure-bf16 training stalls. Here, with p the stored parameters and m the master:

    init:   m = float32(p); inner state = inner.init(m)
    update: u = inner.update(float32(g), inner state, m)   (moments and weight decay in float32)
            m' = m + u;  returns updates m' - float32(p)

  so `optax.apply_updates(p, updates)` = cast(p + (m' - p)) = cast(m'): the stored parameters are the
  master rounded to their dtype (exactly, whenever m' and p are within a factor 2 of each other, as
  after any small step; otherwise to float32 rounding before the cast). Tiny updates accumulate in m
  and reach p once they add up to a bf16 step. Costs 4 bytes per parameter on top of the inner
  state. For float32 parameters it only doubles them: leave `optim.master_dtype='none'` there.
  """
  dtype = jnp.dtype(dtype)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    master = cast(params)
    return MasterState(master=master, inner=inner.init(master))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('with_master_weights: update needs the current params (the stored ones).')
    updates, inner_state = inner.update(cast(grads), state.inner, state.master)
    master = optax.apply_updates(state.master, updates)
    return jax.tree.map(lambda m, p: m - p.astype(dtype), master, params), MasterState(master, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """`config.optim` -> optax chain: clip by global norm (if > 0), then the optimizer; with
  `master_dtype='float32'` (absent: 'none') all of it runs on float32 master weights
  (`with_master_weights`)."""
  c = optim_config
  if c.name not in OPTIMIZERS:
    raise ValueError(f'optim.name={c.name!r}: expected one of {OPTIMIZERS}.')
  lr = schedule(c, total_steps)
  if c.name == 'adamw':
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=_decay_mask)
  elif c.name == 'adam':
    opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
  else:
    opt = optax.sgd(lr)
  if c.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  master = getattr(c, 'master_dtype', 'none')
  if master not in MASTER_DTYPES:
    raise config_lib.ConfigError(f'config.optim.master_dtype={master!r}: expected one of {MASTER_DTYPES}.')
  return opt if master == 'none' else with_master_weights(opt, master)
