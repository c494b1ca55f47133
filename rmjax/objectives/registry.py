"""The registry: every objective piece is reachable by name from a config.

A piece is registered as a *factory*: a function whose keyword arguments are the piece's
options (β, λ, k, ε, margins, modes) and which returns the piece itself (a pure function of
arrays, or a `Transform` for stateful pieces). `get(name, **kwargs)` checks the keyword
arguments against the factory's signature before building, so that a typo in a config is a
`ValueError` naming the valid options rather than a silent default.

    @register('my_loss', kind='rm_loss')
    def my_loss(scale: float = 1.0):
      '''One-line summary shown by `python -m rmjax.objectives`.'''
      def loss(r_chosen, r_rejected):
        return scale * jax.nn.softplus(r_rejected - r_chosen)
      return loss
"""
import inspect
from typing import Any, Callable, NamedTuple

KINDS = (
    'rm_loss',          # (r_chosen [B], r_rejected [B], ...) -> [B]
    'aggregation',      # (scores [K, B], stats=None) -> [B]
    'reward',           # reward transform: (reward, ctx) -> reward, or a Transform
    'advantage',        # (rewards [B, T], mask [B, T], values=None) -> Advantage
    'policy_loss',      # (PolicyBatch) -> (loss [B, T], metrics)
    'preference_loss',  # (policy / reference log-probs of chosen and rejected) -> [B]
)


class Entry(NamedTuple):
  """A registered piece: its name, kind, factory and the first line of its docstring."""
  name: str
  kind: str
  factory: Callable[..., Any]
  summary: str
  alias_of: str | None = None


_REGISTRY: dict[str, Entry] = {}


def register(name: str, *, kind: str, aliases: tuple[str, ...] = ()) -> Callable:
  """Decorator registering a factory under `name` (and `aliases`) for `kind`.

  Raises:
    ValueError: if `kind` is unknown, the name is taken, or the factory has no docstring.
  """
  if kind not in KINDS:
    raise ValueError(f'register({name!r}): unknown kind {kind!r}; use one of {", ".join(KINDS)}.')

  def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
    doc = inspect.getdoc(factory)
    if not doc:
      raise ValueError(f'register({name!r}): give the factory a docstring; its first line is '
                       'the summary listed by `python -m rmjax.objectives`.')
    summary = doc.splitlines()[0]
    for n in (name, *aliases):
      if n in _REGISTRY:
        raise ValueError(f'register({n!r}): the name is already registered by '
                         f'{_REGISTRY[n].factory.__module__}.{_REGISTRY[n].factory.__qualname__}; '
                         'choose another name.')
    _REGISTRY[name] = Entry(name, kind, factory, summary)
    for alias in aliases:
      _REGISTRY[alias] = Entry(alias, kind, factory, summary, alias_of=name)
    return factory

  return decorate


def entry(name: str) -> Entry:
  """The `Entry` registered under `name`.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f'unknown objective piece {name!r}; known pieces: {", ".join(sorted(_REGISTRY))}.')
  return _REGISTRY[name]


def entries(kind: str | None = None) -> list[Entry]:
  """All registered entries (aliases included), sorted by name, optionally of one `kind`."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f'unknown kind {kind!r}; use one of {", ".join(KINDS)}.')
  return [e for _, e in sorted(_REGISTRY.items()) if kind is None or e.kind == kind]


def options(name: str) -> dict[str, Any]:
  """The options of piece `name` with their defaults (`inspect.Parameter.empty` if required)."""
  params = inspect.signature(entry(name).factory).parameters
  return {p.name: p.default for p in params.values()}


def get(name: str, **kwargs: Any) -> Any:
  """Builds the piece registered under `name` with options `kwargs`.

  Raises:
    ValueError: for an unknown name (listing the known ones), an unknown option (listing the
      valid ones) or a missing required option (naming it).
  """
  e = entry(name)
  params = inspect.signature(e.factory).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    valid = ', '.join(params) or '(none)'
    raise ValueError(f'{name!r}: unknown option(s) {", ".join(unknown)}; valid options: {valid}.')
  missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
  if missing:
    raise ValueError(f'{name!r}: missing required option(s) {", ".join(missing)}.')
  return e.factory(**kwargs)
