"""The train state pytree and its shardings."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rmjax import parallel
from rmjax.models import partitioning


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


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh: Mesh):
  """Shardings of an optax state: each moment like its parameter, counts and other leaves replicated."""
  # A per-member optimizer's state has its inner optimizer's structure (see rm_trainer.PerMember).
  template = getattr(optimizer, 'inner', optimizer)
  return optax.tree_utils.tree_map_params(template, lambda _, s: s, abstract_opt_state, param_shardings,
                                          transform_non_params=lambda _: parallel.replicated(mesh))


def param_axes(params, *, population: bool = False):
  """Logical axes of a parameter tree (`rmjax.models.partitioning.logical_axes`).

  population: every leaf has a leading population axis `[P, ...]` (the members of
  `rmjax.rl.population`); it is named 'population' and each member's dimensions are named as
  one model's, so a member is sharded exactly like a single run's parameters.
  """
  if not population:
    return partitioning.logical_axes(params)
  member = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
  return jax.tree.map(lambda names: ('population',) + names, partitioning.logical_axes(member),
                      is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(params, mesh: Mesh, *, population: bool = False,
                    rules: Mapping[str, parallel.MeshAxes] = parallel.RULES):
  """NamedShardings of a parameter tree (arrays or ShapeDtypeStructs) by `param_axes` under `rules`."""
  return parallel.tree_shardings(params, param_axes(params, population=population), mesh, rules)


def place_params(params, mesh: Mesh, *, population: bool = False,
                 rules: Mapping[str, parallel.MeshAxes] = parallel.RULES):
  """`params` moved onto `mesh`, sharded by `param_shardings` (frozen models: references, reward models)."""
  return jax.device_put(params, param_shardings(params, mesh, population=population, rules=rules))


def state_shardings(abstract_state, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    population: bool = False, params: str = 'params', opt_state: str = 'opt_state',
                    rules: Mapping[str, parallel.MeshAxes] = parallel.RULES):
  """NamedShardings for any state NamedTuple (`TrainState`, the RL state, ...).

  The field `params` is sharded by its logical axes (`param_axes`; `population`: a leading
  member axis on every leaf of the state) under `rules`, the field `opt_state` like the
  parameters it holds moments of, and every other leaf (step, rng, controller state) is
  replicated.
  """
  for field in (params, opt_state):
    if not hasattr(abstract_state, field):
      raise ValueError(f'state_shardings: the state {type(abstract_state).__name__} has no field {field!r}; '
                       'name its parameter and optimizer-state fields with params= and opt_state=.')
  shards = param_shardings(getattr(abstract_state, params), mesh, population=population, rules=rules)
  rep = parallel.replicated(mesh)
  out = jax.tree.map(lambda _: rep, abstract_state)
  return out._replace(**{params: shards,
                         opt_state: optimizer_shardings(optimizer, getattr(abstract_state, opt_state), shards, mesh)})


def with_shardings(abstract_state, state_shardings):
  """ShapeDtypeStructs carrying the shardings, as a restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                      state_shardings)
