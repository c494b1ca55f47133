"""Shape checks on entry (chex), raised as `ValueError`s that name the expected shape."""
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


def expect(x: Any, shape: Sequence[int | None], layout: str, name: str, piece: str) -> None:
  """Raises a `ValueError` unless `x` has `shape` (None: any size); `layout` reads e.g. '[K, B]'."""
  try:
    chex.assert_shape(x, tuple(shape))
  except AssertionError:
    want = tuple('?' if s is None else s for s in shape)
    raise ValueError(f'{piece}: {name} must have shape {layout} = {want}, got {jnp.shape(x)}.') from None


def expect_rank(x: Any, rank: int | Sequence[int], layout: str, name: str, piece: str) -> None:
  """Raises a `ValueError` unless `x` has rank `rank` (one of them, if a sequence)."""
  try:
    chex.assert_rank(x, set(rank) if isinstance(rank, (tuple, list)) else rank)
  except AssertionError:
    raise ValueError(f'{piece}: {name} must have shape {layout}, got {jnp.shape(x)}.') from None


def require(x: Any, name: str, piece: str, needed_for: str) -> Any:
  """Returns `x`, or raises a `ValueError` saying `name` is needed if `x` is None."""
  if x is None:
    raise ValueError(f'{piece}: {name} is required {needed_for}.')
  return x


def positive(value: Any, name: str, piece: str) -> None:
  """Raises a `ValueError` if a concrete `value` is not > 0 (traced values are not checked)."""
  if not isinstance(value, jax.core.Tracer) and not np.all(np.asarray(value) > 0):
    raise ValueError(f'{piece}: {name} must be > 0, got {value}.')


def nonnegative(value: Any, name: str, piece: str) -> None:
  """Raises a `ValueError` if a concrete `value` is negative (traced values are not checked)."""
  if not isinstance(value, jax.core.Tracer) and not np.all(np.asarray(value) >= 0):
    raise ValueError(f'{piece}: {name} must be >= 0, got {value}.')


def one_of(value: Any, choices: Sequence[Any], name: str, piece: str) -> None:
  """Raises a `ValueError` unless the static option `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f'{piece}: {name} must be one of {", ".join(map(repr, choices))}; got {value!r}.')
