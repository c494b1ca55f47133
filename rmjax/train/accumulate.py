"""Gradient accumulation: one global batch as N microbatches inside the one compiled step.

`value_and_grad(loss_fn, params, batch, num_micro)` evaluates `loss_fn(params, micro) ->
(loss, aux)` on N microbatches of `batch` (every leaf `[B, ...]`, B divisible by N) in a
`lax.scan`, and returns the **sums** over microbatches of the loss, the aux tree and the
gradients. With a loss that is a sum over rows divided by a normaliser of the whole global
batch (`rmjax.objectives.batch_normalizer`, computed by the caller before splitting), the sums
are exactly the global batch's loss and gradient, up to float summation order: every row keeps
its weight whatever N is (PITFALLS #4). A mean of per-microbatch means would not be.

`grad_accum_steps='auto'` (the RM trainer) picks N from the batch's shape at trace time
(`auto_steps`): on a single CPU device the fewest microbatches of at most `MICROBATCH_TOKENS`
tokens, where the split is measured to be faster than one pass; elsewhere 1.

Microbatch i holds rows `i, i + N, i + 2N, ...` (the batch reshaped to `[B/N, N, ...]`): when
each process's or device's block of rows is divisible by N, every microbatch has the same share
of rows on every device, so splitting needs no communication.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rmjax import config as config_lib


AUTO = 'auto'
MICROBATCH_TOKENS = 1 << 10
"""`auto_steps`' default budget: tokens per microbatch of a training step (the rows of its dense dots)."""


def auto_steps(rows: int, row_size: int, budget: int | None = None) -> int:
  """Microbatches for `rows` rows of `row_size` each (tokens, unless the caller's `budget` counts
  something else): on a single CPU device the smallest divisor N of rows with (rows / N) · row_size
  ≤ `budget` (default `MICROBATCH_TOKENS`; one row per microbatch when no divisor fits), else 1.

  On XLA:CPU a step's time grows faster than its FLOPs once the activations outgrow the caches,
  while the dense dots lose speed below about 1024 rows. Microbatches of 1024 tokens measured
  fastest or within 3% of the fastest split at the `tiny`, `small` and `base` widths, K = 1 and 4,
  128 to 512 tokens a row (docs/benchmarks.md, items 4 and 15; RM step, 16 pairs × 128 tokens:
  `tiny` 44.7 ms unsplit, 39.0 with N = 4; `small` 764 ms with the N = 16 of the earlier budget of
  2¹⁶ activation elements, 694 with N = 4). Accelerators, and meshes that already give each
  device a share of the rows, keep the batch whole.
  """
  if jax.default_backend() != 'cpu' or jax.device_count() > 1:
    return 1
  budget = MICROBATCH_TOKENS if budget is None else budget
  return next(n for n in range(1, rows + 1) if rows % n == 0 and rows // n * row_size <= budget
              or n == rows)


def split(batch: Any, num_micro: int) -> Any:
  """Every leaf `[B, ...]` -> `[N, B/N, ...]`, microbatch i = rows i, i + N, ..."""
  def one(x):
    if x.shape[0] % num_micro:
      raise ValueError(f'grad accumulation: a batch of {x.shape[0]} rows does not split into {num_micro} '
                       'microbatches.')
    return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, batch)


def value_and_grad(loss_fn: Callable, params: Any, batch: Any, num_micro: int) -> tuple[tuple[jax.Array, Any], Any]:
  """((Σ_i loss_i, Σ_i aux_i), Σ_i ∇loss_i) over the N microbatches of `batch` (see module doc).

  `loss_fn(params, micro) -> (loss [], aux)`; aux leaves must be additive (sums, counts).
  `num_micro` = 1 is one plain `jax.value_and_grad` call.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch)

  micros = split(batch, num_micro)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micros))
  # Sums are kept in at least float32 (bf16 gradients would lose the small microbatches' share).
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)

  def body(total, micro):
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, grad_fn(params, micro)), None

  total, _ = jax.lax.scan(body, zeros, micros)
  return jax.tree.map(lambda t, s: t.astype(s.dtype), total, shapes)


def check_steps(train_section, name: str = 'train', *, batch_size: int | None = None,
                batch_field: str | None = None, allow_auto: bool = False) -> int | str:
  """`train_section.grad_accum_steps` (1 when absent), checked to be a positive integer that divides
  this process's rows of the global batch (`batch_size`, default `train_section.batch_size`, named
  `batch_field` in the error, over the process count), or `'auto'` where `allow_auto`; else
  `ConfigError`."""
  steps = train_section.get('grad_accum_steps', 1)
  if steps == AUTO and allow_auto:
    return steps
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    auto = f" or '{AUTO}'" if allow_auto else f" ('{AUTO}' is for the RM trainer)"
    raise config_lib.ConfigError(f'config.{name}.grad_accum_steps={steps!r}: expected a positive integer{auto}.')
  batch = train_section.batch_size if batch_size is None else int(batch_size)
  batch_field = batch_field or f'{name}.batch_size'
  processes = jax.process_count()
  local = batch // processes
  if local % steps:
    raise config_lib.ConfigError(
        f'config.{name}.grad_accum_steps={steps} does not divide the per-process batch of {local} rows '
        f'(config.{batch_field}={batch} over {processes} processes); choose a divisor of {local}.')
  return steps


def reject(train_section, trainer: str, instead: str) -> None:
  """`ConfigError` when `grad_accum_steps` is set (not 1) for a trainer that does not accumulate, so the
  option never silently does nothing (PITFALLS #3); `instead` says what to use there."""
  steps = train_section.get('grad_accum_steps', 1)
  if steps != 1:
    raise config_lib.ConfigError(f'config.train.grad_accum_steps={steps!r}: the {trainer} does not accumulate '
                                 f'gradients; leave it at 1 ({instead}).')
