"""Populations: runs that differ only in seed or numeric hyperparameters, as one vmapped program.

    --config.population.seeds=0,1,2,3
    --config.population.hparams='objective.kl_k2.coef=0.01,0.05,0.1,0.2;optim.lr=1e-3'

P = the longest list; a list of one value is used by every member. `seeds` give each member its
`config.seed` (its sampling and shuffling keys, its value-model init and, for a fresh policy, its
initial policy and reference); `values` set numeric leaves of `config.objective` (a KL
coefficient, λ of `uwo`, a clip range, ...) and `optim.lr`. Member i is exactly the run of the
config with those fields overridden: the objective is built inside the vmapped function from the
member's values (objective coefficients may be traced), and the learning rate sits in the
optimizer state (`optax.inject_hyperparams`), so one program serves every member.

`PopulationState(members, values)`: `members` is an `RLState` whose every leaf has a leading axis
P; `values[path]` `[P]` float32. One iteration is `jit(vmap(iteration))` over the members, the
prompt batch and the frozen models shared (the reference stacked per member only for a fresh
policy with several seeds).

Outputs: the population's own checkpoints and `metrics.jsonl` in `DIR` (keys
`member_<i>/<metric>`, plus the mean over members under the plain name, whose `loss` stops a run
with a non-finite member). At each checkpoint, member i also gets `DIR/members/<i>/`: a
checkpoint of its `RLState` with the metadata of its own config (`kind='rl_policy'`, loadable as
a policy by path), its `metrics.jsonl` (its keys without the prefix) and `rollouts/<step>.jsonl`
— readable as if it were a separate run.
"""
from __future__ import annotations

import copy
import pathlib
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.rl import iteration as it
from rmjax.rl import trainer
from rmjax.train import checkpoint, loop, optim
from rmjax.train import state as state_lib
from rmjax.train.metrics import MetricsWriter, read_metrics

LR = 'optim.lr'


class PopulationState(NamedTuple):
  """members: an `RLState` with a leading population axis P; values: path -> `[P]` float32."""
  members: it.RLState
  values: dict[str, jax.Array]


class Member(NamedTuple):
  """One member: its seed and its values (path -> number)."""
  seed: int
  values: dict[str, float]


def parse_members(config) -> list[Member]:
  """The members named by `config.population` (`seeds`, `values`); raises a `ConfigError` naming what to fix."""
  p = config.population
  seeds = [int(s) for s in str(p.seeds).split(',') if s.strip()] or [int(config.seed)]
  lists: dict[str, list[float]] = {}
  for entry in filter(None, (e.strip() for e in str(p.hparams).split(';'))):
    path, sep, vals = entry.partition('=')
    path = path.strip()
    if not sep or not vals.strip():
      raise config_lib.ConfigError(f"config.population.hparams: entry {entry!r} must read 'path=v1,v2,...'.")
    if path != LR and not path.startswith('objective.'):
      raise config_lib.ConfigError(f'config.population.hparams: {path!r} cannot vary in a population; give '
                                   f'{LR} or a numeric field under objective.')
    try:
      current = config_lib.get(config, path)
    except (KeyError, AttributeError):
      raise config_lib.ConfigError(f'config.population.hparams: {path!r} is not a field of the config.') from None
    if not isinstance(current, float):
      raise config_lib.ConfigError(f'config.population.hparams: {path!r} = {current!r} is not a float field (only '
                                   'real-valued hyperparameters can differ between members of one program).')
    try:
      lists[path] = [float(v) for v in vals.split(',')]
    except ValueError:
      raise config_lib.ConfigError(f'config.population.hparams: {entry!r} holds a value that is not a number.') from None
  sizes = {len(seeds)} | {len(v) for v in lists.values()}
  size = max(sizes)
  if sizes - {1, size}:
    raise config_lib.ConfigError(f'config.population: seeds and hparams list {sorted(sizes)} entries; each must '
                                 f'give one entry or all {size}.')
  pick = lambda xs, i: xs[i] if len(xs) > 1 else xs[0]
  return [Member(pick(seeds, i), {k: pick(v, i) for k, v in lists.items()}) for i in range(size)]


def member_config(config, member: Member) -> ml_collections.ConfigDict:
  """The config of the separate run that `member` is: seed and values set, no population."""
  c = copy.deepcopy(config)
  c.seed = member.seed
  for path, value in member.values.items():
    *parents, leaf = path.split('.')
    config_lib.get(c, '.'.join(parents))[leaf] = float(value)
  c.population = ml_collections.ConfigDict(dict(seeds='', hparams=''))
  return c


def with_values(section: Any, values: dict[str, Any]) -> dict:
  """`section` (the objective, as a dict) with the `objective.*` paths of `values` set (tracers allowed)."""
  out = copy.deepcopy(section.to_dict() if hasattr(section, 'to_dict') else dict(section))
  for path, value in values.items():
    if path == LR:
      continue
    *parents, leaf = path.split('.')[1:]
    node = out
    for name in parents:
      node = node[name]
    node[leaf] = value
  return out


def lr_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """`optim.make_optimizer` with its learning rate in the state (`optax.inject_hyperparams`);
  `set_lr` puts a member's rate there."""
  fields = optim_config.to_dict()
  return optax.inject_hyperparams(
      lambda learning_rate: optim.make_optimizer(types.SimpleNamespace(**dict(fields, lr=learning_rate)),
                                                 total_steps))(learning_rate=float(fields['lr']))


def set_lr(opt_state: Any, lr: jax.Array) -> Any:
  """The `lr_optimizer` state with `learning_rate` = lr."""
  hyper = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, opt_state.hyperparams['learning_rate'].dtype))
  return opt_state._replace(hyperparams=hyper)


def make_population_functions(policy_config, objective_section: Any, settings: it.Settings, scorer: it.Scorer,
                              optimizer: optax.GradientTransformation, *, value_config=None, gold_scorer=None,
                              ref_axis: int | None = None):
  """`(iteration, evaluate)`, unjitted, over a `PopulationState`.

  iteration(pstate, frozen, batch) -> (pstate, metrics [P], Samples [P, ...]).
  evaluate(pstate, frozen, batch, keys [P]) -> (metrics [P], Samples [P, ...]).
  ref_axis: 0 when `frozen.ref_params` is stacked per member, None when shared.
  """
  def fns(values):
    return it.make_functions(policy_config, with_values(objective_section, values), settings, scorer, optimizer,
                             value_config=value_config, gold_scorer=gold_scorer)

  axes = it.Frozen(ref_params=ref_axis, reward_params=None, stats=None, gold_params=None)

  def iteration(pstate: PopulationState, frozen: it.Frozen, batch):
    def one(state, values, fr):
      return fns(values).iteration_samples(state, fr, batch)
    new, metrics, samples = jax.vmap(one, in_axes=(0, 0, axes))(pstate.members, pstate.values, frozen)
    return PopulationState(new, pstate.values), metrics, samples

  def evaluate(pstate: PopulationState, frozen: it.Frozen, batch, keys):
    def one(state, values, fr, key):
      return fns(values).evaluate(state, fr, batch, key)
    return jax.vmap(one, in_axes=(0, 0, axes, 0))(pstate.members, pstate.values, frozen, keys)

  return iteration, evaluate


def population_shardings(abstract: PopulationState, optimizer: optax.GradientTransformation, mesh) -> PopulationState:
  """Every member's parameters and optimizer moments sharded like one run's (`state_shardings`
  with the leading population axis replicated); step, keys, controller states and values replicated."""
  rep = parallel.replicated(mesh)
  return PopulationState(state_lib.state_shardings(abstract.members, optimizer, mesh, population=True),
                         jax.tree.map(lambda _: rep, abstract.values))


def member_slice(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda x: x[i], tree)


def flat_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-member metrics `[P]` -> scalars: `<name>` (the mean over members) and `member_<i>/<name>`."""
  out = {k: v.mean() for k, v in metrics.items()}
  out.update({f'member_{i}/{k}': v[i] for k, v in metrics.items() for i in range(next(iter(metrics.values())).shape[0])})
  return out


def split_metrics(workdir: pathlib.Path, members: int) -> None:
  """Rewrites `members/<i>/metrics.jsonl` from the population's file: `<section>/member_<i>/<name>` -> `<section>/<name>`."""
  rows = read_metrics(workdir / 'metrics.jsonl')
  for i in range(members):
    tag = f'member_{i}/'
    path = workdir / 'members' / str(i)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'metrics.jsonl').unlink(missing_ok=True)
    with MetricsWriter(path, tensorboard=False) as writer:
      for row in rows:
        scalars = {}
        for key, value in row.items():
          section, _, rest = key.partition('/')
          if rest.startswith(tag):
            scalars[f'{section}/{rest[len(tag):]}'] = value
        if scalars:
          writer.write(int(row['step']), scalars)


def run(config, workdir: str) -> dict:
  """Trains the members of `config.population` as one program; returns the final checkpoint's metadata."""
  members = parse_members(config)
  configs = [member_config(config, m) for m in members]
  for c in configs:
    trainer.validate(c)
  workdir = pathlib.Path(workdir)
  setup = trainer.build(config)
  size = len(members)
  seeds = jnp.asarray([m.seed for m in members], jnp.uint32)
  paths = sorted(members[0].values)
  values = {p: jnp.asarray([m.values[p] for m in members], jnp.float32) for p in paths}
  vary_lr = LR in paths
  total = trainer.total_updates(config)
  optimizer = lr_optimizer(config.optim, total) if vary_lr else optim.make_optimizer(config.optim, total)
  objective = objectives.build(config.objective)
  fresh = setup.base_params is None and len({m.seed for m in members}) > 1
  if setup.base_params is None and not fresh:
    ref = jax.jit(lambda: trainer.initial_policy(setup, members[0].seed))()
  else:
    ref = setup.base_params if not fresh else jax.jit(jax.vmap(lambda s: trainer.initial_policy(setup, s)))(seeds)
  frozen = trainer.place_frozen(trainer.frozen_models(setup, ref), setup.mesh, ref_population=fresh)
  iteration, evaluate = make_population_functions(
      setup.policy_cfg, config.objective, setup.settings, setup.scorer, optimizer, value_config=setup.value_cfg,
      gold_scorer=setup.gold_scorer, ref_axis=0 if fresh else None)

  def init():
    def one(seed, ref_params, lr):
      state = trainer.init_run_state(setup, ref_params, optimizer, objective, seed)
      return state._replace(opt_state=set_lr(state.opt_state, lr)) if vary_lr else state
    lrs = values[LR] if vary_lr else jnp.zeros(size)
    return PopulationState(jax.vmap(one, in_axes=(0, 0 if fresh else None, 0))(seeds, ref, lrs), values)

  abstract = jax.eval_shape(init)
  shardings = population_shardings(abstract, optimizer, setup.mesh)

  def step(pstate, frozen, batch):
    pstate, metrics, _ = iteration(pstate, frozen, batch)
    return pstate, flat_metrics(metrics)

  step_fn = jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
  eval_fn = jax.jit(evaluate)
  held_out = parallel.global_batch(setup.held_out, setup.mesh)
  eval_keys = jax.vmap(trainer.eval_key)(seeds)

  @trainer.once_per_step(lambda pstate: pstate.members.step[0])
  def run_eval(pstate):
    metrics, samples = eval_fn(pstate, frozen, held_out, eval_keys)
    return {f'eval/{k}': float(v) for k, v in jax.device_get(flat_metrics(metrics)).items()}, samples

  def metadata(pstate):
    # At each checkpoint: every member's own checkpoint, rollouts and metrics file.
    _, samples = run_eval(pstate)
    step = int(jax.device_get(pstate.members.step[0]))
    for i, c in enumerate(configs):
      out = workdir / 'members' / str(i)
      trainer.write_rollouts(out / 'rollouts' / f'{step}.jsonl', member_slice(samples, i),
                             trainer.rollout_prompt_ids(setup), int(config.data.prompt_len), setup.tok)
      with checkpoint.Checkpointer(out / 'checkpoints', max_to_keep=int(config.train.keep),
                                   async_save=False) as ckpt:
        meta = dict(trainer.run_metadata(c, setup), member=i, population=str(workdir), data_step=step)
        ckpt.save(step, member_slice(pstate.members, i), meta, force=True)
    split_metrics(workdir, size)
    return dict(loop.describe(config, kind='rl_population', model=setup.policy_cfg.to_dict(),
                              tokenizer=setup.tok.to_dict()), members=[m._asdict() for m in members])

  _, meta = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc=f'population of {size}'),
      train_step=lambda pstate, batch: step_fn(pstate, frozen, batch),
      init_state=lambda: jax.jit(init, out_shardings=shardings)(),
      abstract_state=state_lib.with_shardings(abstract, shardings),
      batches=setup.batches, mesh=setup.mesh, metadata=metadata, evaluate=lambda s: run_eval(s)[0])
  return meta
