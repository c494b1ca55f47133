"""Optimizers from config: AdamW (or Adam, SGD) with warmup + cosine decay and gradient clipping."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ('adamw', 'adam', 'sgd')
SCHEDULES = ('cosine', 'constant', 'linear')


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


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """`config.optim` -> optax chain: clip by global norm (if > 0), then the optimizer."""
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
  return opt
