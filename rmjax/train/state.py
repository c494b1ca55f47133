"""The train state pytree and its shardings."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rmjax import parallel


class TrainState(NamedTuple):
  """Everything a step reads and writes; a checkpoint stores exactly this.

  step: int32 scalar, the number of updates applied (and the index of the next batch).
  params: the model's parameter tree.
  opt_state: the optax state.
  rng: uint32 key data `[2]` (`jax.random.key_data`); a step uses `fold_in(rng, step)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)


def step_key(state: TrainState) -> jax.Array:
  """The PRNG key of the current step: fold_in(rng, step), so a resumed run draws the same keys."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def shardings(abstract_state: TrainState, param_axes, optimizer: optax.GradientTransformation,
              mesh: Mesh) -> TrainState:
  """NamedShardings for a state: params (and their optimizer moments) by logical axes, the rest replicated."""
  param_shardings = parallel.tree_shardings(abstract_state.params, param_axes, mesh)
  # A per-member optimizer's state has its inner optimizer's structure (see rm_trainer.PerMember).
  template = getattr(optimizer, 'inner', optimizer)
  opt_shardings = optax.tree_utils.tree_map_params(
      template, lambda _, s: s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh))
  rep = parallel.replicated(mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def with_shardings(abstract_state, state_shardings):
  """ShapeDtypeStructs carrying the shardings, as a restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                      state_shardings)
