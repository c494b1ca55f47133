"""Composition: reward pieces as `Transform`s, and a whole objective built from a config section.

    config.objective.reward = 'uwo,log_sigmoid'      # or a tuple of names
    config.objective.uwo = dict(lam=0.5)            # options of a piece, under its name
    config.objective.advantage = 'rloo'
    config.objective.rloo = dict(group_size=4)
    config.objective.loss = 'ppo_clip,kl_k2'
    config.objective.kl_k2 = dict(coef=0.05)
    config.objective.reduction = 'token_mean'
    objective = build(config.objective)

Every number stays overridable from the command line (`--config.objective.uwo.lam=0.2`); names
may be a comma-separated string, since ml-collections cannot override a list.
"""
from typing import Any, Callable, Mapping, NamedTuple

from rmjax.objectives import _checks
from rmjax.objectives import reduction
from rmjax.objectives.base import RewardContext, Transform, chain, stateless
from rmjax.objectives.policy_losses import sum_losses
from rmjax.objectives.registry import entry, get

FIELDS = {
    'rm_loss': ('rm_loss',),
    'reward': ('aggregation', 'reward'),
    'advantage': ('advantage',),
    'loss': ('policy_loss',),
    'preference_loss': ('preference_loss',),
}
SETTINGS = ('reduction', 'reduction_constant')


def transform(name: str, **kwargs: Any) -> Transform:
  """The reward-side piece `name` as a `Transform` (apply(reward, state, ctx) -> (reward, state)).

  An aggregation reads its member statistics from `ctx.stats`; a stateless transform gets an
  empty state; a stateful one is returned as built.
  """
  e = entry(name)
  if e.kind not in FIELDS['reward']:
    raise ValueError(f'transform: {name!r} is of kind {e.kind}, not a reward transform or aggregation.')
  piece = get(name, **kwargs)
  if isinstance(piece, Transform):
    return piece
  if e.kind == 'aggregation':
    return stateless(lambda scores, ctx: piece(scores, ctx.stats))
  return stateless(piece)


class Objective(NamedTuple):
  """A built objective; unselected parts are None.

  Attributes:
    rm_loss: `loss(r_chosen [B], r_rejected [B], ...) -> [B]`.
    reward: the chained reward `Transform`.
    advantage: an advantage function, or a `Transform` for stateful estimators.
    loss: the summed policy loss `fn(PolicyBatch) -> (loss [B, T], metrics)`.
    preference_loss: a direct-preference loss `-> [B]`.
    reduction: the reduction mode (one of `MODES`).
    reduction_constant: the fixed length of the `constant` mode, else None.
  """
  rm_loss: Callable | None
  reward: Transform | None
  advantage: Callable | Transform | None
  loss: Callable | None
  preference_loss: Callable | None
  reduction: str
  reduction_constant: float | None

  def reduce(self, values: Any, mask: Any, normalizer: Any = None) -> Any:
    """`reduce(values, mask, self.reduction, ...)` with this objective's constant."""
    return reduction.reduce(values, mask, self.reduction, constant=self.reduction_constant,
                            normalizer=normalizer)

  def init_reward_state(self) -> Any:
    """The reward chain's initial state (empty tuple if no reward pieces)."""
    return () if self.reward is None else self.reward.init()

  def apply_reward(self, reward: Any, state: Any, ctx: RewardContext = RewardContext()) -> Any:
    """The reward chain; with no reward pieces, `reward` unchanged."""
    return (reward, state) if self.reward is None else self.reward.apply(reward, state, ctx)


def _names(value: Any, field: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [n.strip() for n in value.split(',') if n.strip()]
  if isinstance(value, (tuple, list)) and all(isinstance(n, str) for n in value):
    return list(value)
  raise ValueError(f'build: {field} must be a name, a comma-separated string of names or a tuple '
                   f'of names; got {value!r}.')


def _as_dict(value: Any, where: str) -> dict[str, Any]:
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, Mapping):
    return dict(value)
  raise ValueError(f'build: {where} must be a ConfigDict or dict, got {type(value).__name__}.')


def build(section: Any) -> Objective:
  """Builds an `Objective` from a config section (a ConfigDict or dict).

  Fields: `rm_loss`, `reward` (names, applied in order), `advantage`, `loss` (names, summed),
  `preference_loss`, `reduction` (default 'token_mean'), `reduction_constant`; the options of a
  selected piece live under its name.

  Raises:
    ValueError: for an unknown field (listing the valid ones), a piece of the wrong kind for its
      field, options given for a piece that is not selected (they would be ignored), or any
      error of `get`.
  """
  cfg = _as_dict(section, 'the objective section')
  selected: dict[str, list[str]] = {f: _names(cfg.get(f), f) for f in FIELDS}
  chosen = {n for names in selected.values() for n in names}
  for field, names in selected.items():
    if field not in ('reward', 'loss') and len(names) > 1:
      raise ValueError(f'build: {field} takes one name, got {", ".join(names)}.')
    for n in names:
      kind = entry(n).kind
      if kind not in FIELDS[field]:
        raise ValueError(f'build: {n!r} is of kind {kind} and cannot go in {field!r} '
                         f'(which takes {" or ".join(FIELDS[field])}).')
  for key in cfg:
    if key in FIELDS or key in SETTINGS or key in chosen:
      continue
    try:
      entry(key)
    except ValueError:
      raise ValueError(f'build: unknown field {key!r}; valid fields: '
                       f'{", ".join((*FIELDS, *SETTINGS))}, or the name of a selected piece '
                       'holding its options.') from None
    raise ValueError(f'build: options are given for {key!r}, which no field selects; add it to '
                     'a field or remove its options.')

  def options(n):
    return _as_dict(cfg[n], f'the options of {n!r}') if n in cfg else {}

  def one(field):
    return get(selected[field][0], **options(selected[field][0])) if selected[field] else None

  mode = cfg.get('reduction', 'token_mean')
  _checks.one_of(mode, reduction.MODES, 'reduction', 'build')
  constant = cfg.get('reduction_constant')
  if (mode == 'constant') != (constant is not None):
    raise ValueError("build: reduction_constant is required by reduction='constant' and used by "
                     'no other mode.')
  reward = [transform(n, **options(n)) for n in selected['reward']]
  loss = [get(n, **options(n)) for n in selected['loss']]
  return Objective(
      rm_loss=one('rm_loss'),
      reward=chain(*reward) if reward else None,
      advantage=one('advantage'),
      loss=sum_losses(*loss) if loss else None,
      preference_loss=one('preference_loss'),
      reduction=mode,
      reduction_constant=constant,
  )
