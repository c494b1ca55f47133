"""Sweeps: lists of config overrides, built with `axis`, `product` and `zip`.

A config file may define `get_sweep(arg)` (or `get_sweep()`) beside `get_config(arg)`; it
returns a list of override dicts, one per point, keyed by dotted config paths::

  def get_sweep(arg='test'):
    return sweep.product(sweep.axis('optim.lr', (1e-3, 3e-3)),
                         sweep.zip(sweep.axis('seed', (0, 1)), sweep.axis('data.seed', (10, 11))))

gives 2 x 2 = 4 points, e.g. `{'optim.lr': 0.001, 'seed': 0, 'data.seed': 10}`. Each point runs
in its own sub-workdir named from its overrides (`point_name`).
"""
from __future__ import annotations

import builtins
import hashlib
import importlib.util
import itertools
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from rmjax import config as config_lib

Point = dict[str, Any]

_MAX_NAME = 120


def axis(key: str, values: Sequence[Any]) -> list[Point]:
  """One swept field: `[{key: v} for v in values]`."""
  if not isinstance(key, str) or not key:
    raise ValueError(f'sweep.axis: the key must be a dotted config path like "optim.lr", got {key!r}.')
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ValueError(f'sweep.axis({key!r}, ...): values must be a non-empty list or tuple, got {values!r}.')
  return [{key: v} for v in values]


def _merge(points: Sequence[Mapping[str, Any]]) -> Point:
  out: Point = {}
  for p in points:
    clash = sorted(out.keys() & p.keys())
    if clash:
      raise ValueError(f'sweep: the key(s) {clash} are swept by more than one factor; sweep each key once.')
    out.update(p)
  return out


def product(*sweeps: Sequence[Mapping[str, Any]]) -> list[Point]:
  """Cartesian product of sweeps (the last varies fastest); the points' dicts are merged."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip(*sweeps: Sequence[Mapping[str, Any]]) -> list[Point]:  # pylint: disable=redefined-builtin
  """Sweeps of equal length taken side by side: point i merges point i of each."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f'sweep.zip: the sweeps have lengths {lengths}; zip needs equal lengths (use product '
                     'to combine sweeps of different lengths).')
  return [_merge(combo) for combo in builtins.zip(*sweeps)]


def _load_module(path: str):
  file = pathlib.Path(path)
  if not file.is_file():
    raise config_lib.ConfigError(f'config file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(f'_rmjax_sweep_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(spec: str) -> list[Point]:
  """`'configs/x.py:arg'` -> the points of its `get_sweep(arg)`; `[{}]` (one point) without `get_sweep`."""
  path, _, arg = spec.partition(':')
  module = _load_module(path)
  if not hasattr(module, 'get_sweep'):
    return [{}]
  points = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(points, Sequence) or not points or not all(isinstance(p, Mapping) for p in points):
    raise config_lib.ConfigError(f'{path}: get_sweep() must return a non-empty list of override dicts, '
                                 f'got {points!r}.')
  return [dict(p) for p in points]


def value_text(v: Any) -> str:
  """How a value appears in point names and tables: floats by repr, tuples as `(a,b)`."""
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(value_text(x) for x in v) + ')'
  return str(v)


def point_name(overrides: Mapping[str, Any]) -> str:
  """Sub-workdir name of a point: `key=value` pairs in sorted key order joined by `,`.

  Characters other than letters, digits and `._-=,()+` become `_`; a name longer than 120
  characters is cut and ends with a hash of the full name. No overrides: `default`.
  """
  if not overrides:
    return 'default'
  text = ','.join(f'{k}={value_text(overrides[k])}' for k in sorted(overrides))
  name = re.sub(r'[^A-Za-z0-9._\-=,()+]', '_', text)
  if len(name) > _MAX_NAME:
    name = name[:_MAX_NAME - 13] + '-' + hashlib.sha256(text.encode()).hexdigest()[:12]
  return name


def unique_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """`point_name` of every point; raises if two points would share a sub-workdir."""
  names = [point_name(p) for p in points]
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if n in seen:
      raise config_lib.ConfigError(f'sweep points {seen[n]} and {i} are the same ({points[i]}); '
                                   'every point must differ in at least one override.')
    seen[n] = i
  return names


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted key set to its value (lists become tuples).

  Raises `ConfigError` naming the key for an unknown key (with the valid keys) or a value of
  the wrong type.
  """
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
  for key, value in overrides.items():
    config_lib.check_override_keys(config, [f'--config.{key}=_'])
    *parents, last = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[last] = value
    except TypeError as e:
      raise config_lib.ConfigError(f'sweep override {key}={value!r}: {e}') from e
  return config
