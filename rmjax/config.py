"""Config loading and validation, before anything compiles.

Configs are `ml_collections.ConfigDict`s built by `get_config(arg)` in a file of `configs/`.
Every number and name in them can be overridden from the command line
(`--config.optim.lr=1e-4`); tuples stand in for lists, which ml-collections cannot override.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from rmjax.models import config as model_config_lib
from rmjax.models.config import ModelConfig, get_size


class ConfigError(ValueError):
  """A bad config: names the key and what is allowed."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`'configs/rm.py:tiny'` -> `get_config('tiny')` of that file (or `get_config()` without an arg)."""
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location(f'_rmjax_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_keys(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = 'config') -> None:
  """Raise `ConfigError` for a `--config.a.b=v` whose key does not exist, listing the valid keys."""
  prefix = f'--{flag}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].partition('=')[0]
    node, walked = config, []
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(walked) or 'the top level'
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f'unknown config key {key!r} in {arg!r}: {where} has no field {part!r}; '
                          f'valid keys at {where}: {", ".join(valid) or "(none, it is a value)"}.')
      node = node[part]
      walked.append(part)


def get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def require_choice(config, path: str, choices: Sequence[Any]) -> None:
  value = get(config, path)
  if value not in choices:
    raise ConfigError(f'config.{path}={value!r}: expected one of {tuple(choices)}.')


def require_positive(config, *paths: str, allow_zero: bool = False) -> None:
  for path in paths:
    value = get(config, path)
    if not isinstance(value, (int, float)) or (value < 0 if allow_zero else value <= 0):
      raise ConfigError(f'config.{path}={value!r}: expected a {"non-negative" if allow_zero else "positive"} '
                        'number.')


def require_range(config, path: str, low: float, high: float) -> None:
  value = get(config, path)
  if not isinstance(value, (int, float)) or not low <= value <= high:
    raise ConfigError(f'config.{path}={value!r}: expected a number in [{low}, {high}].')


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


# Sections shared by the files in configs/.

def optim(lr: float = 1e-3, warmup_steps: int = 20, schedule: str = 'cosine', weight_decay: float = 0.01,
          grad_clip: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW with linear warmup, then cosine decay to lr * final_lr_ratio; global-norm clipping (0: off);
  `master_dtype='float32'` keeps float32 master weights for bfloat16 params (`rmjax.train.optim`)."""
  return ml_collections.ConfigDict(dict(name='adamw', lr=lr, warmup_steps=warmup_steps, schedule=schedule,
                                        final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                        weight_decay=weight_decay, grad_clip=grad_clip, master_dtype='none'))


def train(steps: int, *, batch_size: int = 32, log_every: int = 25, eval_every: int = 0,
          checkpoint_every: int = 100) -> ml_collections.ConfigDict:
  """Loop settings; `fail_at_step >= 0` injects a failure before that step (for resume tests);
  `save_initial` also evaluates and checkpoints the starting state as step 0 (curves start there);
  `extra_steps` lists more steps to log, evaluate and checkpoint at; `grad_accum_steps` runs each
  global batch as that many microbatches in one step (`rmjax.train.accumulate`; it must divide the
  per-process batch; `'auto'` lets the RM trainer choose, `rmjax.train.accumulate.auto_steps`)."""
  accum = config_dict.FieldReference(1, field_type=object)  # an int or 'auto'
  return ml_collections.ConfigDict(dict(steps=steps, batch_size=batch_size, grad_accum_steps=accum,
                                        log_every=log_every, eval_every=eval_every,
                                        checkpoint_every=checkpoint_every, keep=3, fail_at_step=-1,
                                        progress=True, save_initial=False, extra_steps=()))


_MODEL_FIELDS = ('vocab_size', 'width', 'mlp_width', 'num_layers', 'num_heads', 'num_kv_heads', 'max_len')
_MODEL_OPTIONS = dict(remat='none', scan_layers=False, dtype='float32', param_dtype='float32')
_MODEL_CHOICES = dict(remat=model_config_lib.REMAT, dtype=model_config_lib.DTYPES,
                      param_dtype=model_config_lib.DTYPES)


def model(size: str = 'tiny', **overrides: Any) -> ml_collections.ConfigDict:
  """A named size of `rmjax.models.config.SIZES` plus overrides; a field left at 0 keeps the size's value.

  Options (`rmjax.models.config.ModelConfig` documents them): `remat` ('none' | 'block'),
  `scan_layers` (bool), `dtype` (compute) and `param_dtype` (storage), 'float32' or 'bfloat16'.
  """
  fields = dict(size=size, family='llama', tie_embeddings=False, **{f: 0 for f in _MODEL_FIELDS},
                **_MODEL_OPTIONS)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def model_config(section: ml_collections.ConfigDict, **fixed: Any) -> ModelConfig:
  """A model section -> `ModelConfig`; `fixed` (e.g. vocab_size from the tokenizer) fills unset fields.
  Options missing from the section (older configs) keep their defaults."""
  overrides = {f: section[f] for f in _MODEL_FIELDS if section[f]}
  for f, v in fixed.items():
    overrides.setdefault(f, v)
  options = {f: section.get(f, default) for f, default in _MODEL_OPTIONS.items()}
  for f in ('remat', 'dtype', 'param_dtype'):
    if options[f] not in _MODEL_CHOICES[f]:
      raise ConfigError(f'config (model section) {f}={options[f]!r}: expected one of {_MODEL_CHOICES[f]}.')
  if not isinstance(options['scan_layers'], bool):
    raise ConfigError(f'config (model section) scan_layers={options["scan_layers"]!r}: expected True or False.')
  return get_size(section.size, family=section.family, tie_embeddings=section.tie_embeddings, **options,
                  **overrides)


def mesh() -> ml_collections.ConfigDict:
  """Device mesh `data x fsdp x tensor`; the product must be the device count, -1 takes what is left."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
