"""Studies as pipelines of cached stages.

A stage reads some config fields and consumes the results of earlier stages. Its key is a hash
of the values it reads and of the keys of the stages it consumes, and its output lives in
`WORKDIR/<stage>/<key>/`. When the stage finishes, `stage.json` is written there atomically
(write to a temporary file, then rename) with the key, the values read, the digests of the
consumed stages' records, the stage's JSON result and its wall time. A stage is skipped when
its record exists and the consumed stages' records are the ones it was computed from:

- changing a config field a stage reads gives it (and everything downstream) a new key, so new
  folders; the old ones stay and are reused if the config changes back;
- a stage redone under the same key (`redo=`, or because an input changed) gets a new record,
  which invalidates exactly the stages that consumed the old one;
- a stage killed midway has no record: rerunning resumes it (trainers resume from their own
  checkpoints inside the stage folder);
- an option in `NEUTRAL_DEFAULTS` at its default value is left out of the key, so adding such an
  option to a config section does not send finished stages to new folders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from rmjax import config as config_lib

RECORD = 'stage.json'

# Options whose default reproduces the program from before the option existed (field name ->
# that default). At that value they are left out of stage keys; add an option here when it is
# added to a config section that stages read and its default changes nothing.
NEUTRAL_DEFAULTS: Mapping[str, Any] = {'grad_accum_steps': 1, 'remat': 'none', 'scan_layers': False,
                                       'master_dtype': 'none', 'dtype': 'float32', 'param_dtype': 'float32',
                                       'extra_steps': []}


@dataclasses.dataclass(frozen=True)
class Stage:
  """A finished stage: its name, key, folder, JSON result and the digest of its record."""
  name: str
  key: str
  dir: pathlib.Path
  result: Any
  digest: str
  wall_s: float
  skipped: bool


def _jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return value


def _key_value(value: Any) -> Any:
  """`value` as JSON, without the `NEUTRAL_DEFAULTS` options that are at their default."""
  value = json.loads(json.dumps(_jsonable(value), sort_keys=True, default=str))
  if isinstance(value, dict):
    return {k: _key_value(v) for k, v in value.items() if k not in NEUTRAL_DEFAULTS or v != NEUTRAL_DEFAULTS[k]}
  if isinstance(value, list):
    return [_key_value(v) for v in value]
  return value


def _hash(obj: Any, n: int = 12) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Pipeline:
  """Runs stages under `workdir`; `redo` names stages to recompute (and so what follows them)."""

  def __init__(self, workdir: str | os.PathLike, *, redo: Sequence[str] = (), known: Sequence[str] = ()):
    self.workdir = pathlib.Path(workdir)
    self.redo = set(redo)
    unknown = sorted(self.redo - set(known)) if known else []
    if unknown:
      raise config_lib.ConfigError(f'--redo: unknown stages {unknown}; the stages are {list(known)}.')
    self.stages: dict[str, Stage] = {}

  def key(self, reads: Mapping[str, Any], after: Sequence[Stage]) -> str:
    return _hash({'reads': {k: _key_value(v) for k, v in reads.items()}, 'after': {s.name: s.key for s in after}})

  def run(self, name: str, fn: Callable[[pathlib.Path], Any], *, reads: Mapping[str, Any],
          after: Sequence[Stage] = ()) -> Stage:
    """Run (or skip) stage `name`: `fn(folder) -> JSON-able result`."""
    key = self.key(reads, after)
    folder = self.workdir / name / key
    record_path = folder / RECORD
    inputs = {s.name: s.digest for s in after}
    if record_path.exists() and name not in self.redo:
      record = json.loads(record_path.read_text())
      if record['inputs'] == inputs:
        stage = Stage(name, key, folder, record['result'], _hash(record), record['wall_s'], skipped=True)
        self.stages[name] = stage
        print(f'[{name}] done before ({folder}); skipped')
        return stage
    if record_path.exists():  # redone, or an input was recomputed: start the folder afresh
      shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    print(f'[{name}] running in {folder}')
    start = time.perf_counter()
    result = fn(folder)
    wall = time.perf_counter() - start
    record = {'stage': name, 'key': key, 'reads': {k: _jsonable(v) for k, v in reads.items()}, 'inputs': inputs,
              'result': result, 'wall_s': wall, 'finished': time.time()}
    tmp = folder / (RECORD + '.tmp')
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, record_path)
    print(f'[{name}] finished in {wall:.1f} s')
    stage = Stage(name, key, folder, result, _hash(record), wall, skipped=False)
    self.stages[name] = stage
    return stage

  def build(self, name: str, build: Callable[[pathlib.Path], Any], *, reads: Mapping[str, Any],
            after: Sequence[Stage] = (), summary: Callable[[Any], Any] = lambda _: None) -> tuple[Stage, Any]:
    """Run stage `name` whose artifact `build(folder)` is idempotent: it trains or resumes in an
    unfinished folder, and only loads from a finished one. Returns (stage, artifact); the record's
    result is `summary(artifact)`."""
    built = {}

    def fn(folder):
      built['artifact'] = build(folder)
      return summary(built['artifact'])

    stage = self.run(name, fn, reads=reads, after=after)
    return stage, built['artifact'] if 'artifact' in built else build(stage.dir)
