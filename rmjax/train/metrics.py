"""Metrics writers: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard event files.

File format: each line is `{"step": <int>, "<name>": <value>, ...}\\n` with values as JSON numbers;
the non-finite floats NaN, +inf and -inf are written as the JSON strings `"NaN"`, `"Infinity"` and
`"-Infinity"` (strict JSON has no literal for them) and `read_metrics` turns them back into floats.

Fault tolerance: each line goes to the file in one unbuffered `write` on an append-mode file, so a
kill leaves at most one torn last line; opening a `MetricsWriter` truncates such a line (one not
ending in a newline, or a last line that is not valid JSON). With `resume_step`, lines with
`step > resume_step` (written after the checkpoint being resumed) are dropped, so a resumed run's
file holds each step once. No TensorFlow is imported (events are written by tensorboardX).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

_NONFINITE_TO_JSON = {'nan': 'NaN', 'inf': 'Infinity', '-inf': '-Infinity'}
_JSON_TO_NONFINITE = {v: float(k) for k, v in _NONFINITE_TO_JSON.items()}


def _encode(value: float) -> float | str:
  """A finite float as is; NaN / inf / -inf as the strings "NaN" / "Infinity" / "-Infinity"."""
  return value if math.isfinite(value) else _NONFINITE_TO_JSON[repr(value)]


def _decode(value: Any) -> Any:
  """Inverse of `_encode` for a value read from the file (other values pass through)."""
  if isinstance(value, str) and value in _JSON_TO_NONFINITE:
    return _JSON_TO_NONFINITE[value]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return value


def _parse_line(line: bytes) -> dict | None:
  """The record on one line, or None when it is not a JSON object with an int "step"."""
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  if not isinstance(record, dict) or not isinstance(record.get('step'), int):
    return None
  return record


def _repair(path: pathlib.Path, resume_step: int | None) -> None:
  """Truncates a torn last line of `path` and, with `resume_step`, drops lines with step > resume_step.

  Raises a ValueError naming the file and line for a malformed line before the last one.
  """
  if not path.exists():
    return
  data = path.read_bytes()
  lines = data.split(b'\n')
  lines.pop()  # b'' when the file ends in a newline, else a torn line
  if lines and _parse_line(lines[-1]) is None:
    lines.pop()  # a complete but invalid last line is torn as well
  kept = []
  for number, line in enumerate(lines, start=1):
    record = _parse_line(line)
    if record is None:
      raise ValueError(f'{path}:{number}: not a metrics record (a JSON object with an int "step"): '
                       f'{line[:200]!r}. Fix or remove that line.')
    if resume_step is None or record['step'] <= resume_step:
      kept.append(line)
  content = b''.join(line + b'\n' for line in kept)
  if content == data:
    return
  if data.startswith(content):
    os.truncate(path, len(content))
  else:  # dropped lines are not all at the end: rewrite through a temporary file and an atomic rename
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _tensorboardx():
  """tensorboardX, imported without torch unless torch is already loaded: its writer imports torch
  whenever it is installed (about 2 s per process) only to accept torch tensors, which rmjax never
  passes."""
  if 'tensorboardX' in sys.modules:
    return sys.modules['tensorboardX']
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    return importlib.import_module('tensorboardX')
  finally:
    if hide:
      del sys.modules['torch']


class MetricsWriter:
  """Appends scalars to `WORKDIR/metrics.jsonl` and, optionally, to `WORKDIR/tensorboard/` events.

  Create it on one process only (e.g. `jax.process_index() == 0`). With `resume_step`, the JSONL
  file is cut back to steps <= resume_step and TensorBoard is told (its `purge_step`) to discard
  older events with a larger step.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
               tensorboard: bool = True):
    if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                    or resume_step < 0):
      raise ValueError(f'resume_step must be None or a non-negative int, got {resume_step!r}.')
    self._workdir = pathlib.Path(workdir)
    self._workdir.mkdir(parents=True, exist_ok=True)
    self._path = self._workdir / METRICS_FILE
    _repair(self._path, resume_step)
    self._file = open(self._path, 'ab', buffering=0)  # pylint: disable=consider-using-with
    self._tensorboard = None
    if tensorboard:
      self._tensorboard = _tensorboardx().SummaryWriter(
          logdir=str(self._workdir / TENSORBOARD_DIR),
          purge_step=None if resume_step is None else resume_step + 1)

  @property
  def path(self) -> pathlib.Path:
    return self._path

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one line `{"step": step, **scalars}` (values as floats) and the TensorBoard scalars."""
    if self._file.closed:
      raise ValueError(f'MetricsWriter for {self._path} is closed.')
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f'step must be a non-negative int, got {step!r}.')
    values = {}
    for name, value in scalars.items():
      if not isinstance(name, str) or name == 'step':
        raise ValueError(f'metric names must be strings other than "step", got {name!r}.')
      try:
        values[name] = float(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f'metric {name!r} at step {step} is not a scalar number: {value!r}.') from e
    record = {'step': step, **{name: _encode(v) for name, v in values.items()}}
    line = (json.dumps(record, allow_nan=False, ensure_ascii=False) + '\n').encode('utf-8')
    written = self._file.write(line)
    while written < len(line):  # an unbuffered write may be partial
      written += self._file.write(line[written:])
    if self._tensorboard is not None:
      for name, value in values.items():
        self._tensorboard.add_scalar(name, value, step)

  def flush(self) -> None:
    """Pushes pending TensorBoard events to disk (the JSONL file is never buffered)."""
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    """Closes both files; calling it again does nothing."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    self._file.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Reads a metrics file (or `WORKDIR/metrics.jsonl` given the workdir) as a list of records.

  Each record is `{'step': int, name: float, ...}` with "NaN" / "Infinity" / "-Infinity" turned
  back into floats. A last line without its newline (a write in progress or a kill) is skipped;
  any other malformed line raises a ValueError naming the file and line.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  lines = path.read_bytes().split(b'\n')
  lines.pop()  # b'' after the final newline, or a torn last line
  records = []
  for number, line in enumerate(lines, start=1):
    record = _parse_line(line)
    if record is None:
      raise ValueError(f'{path}:{number}: not a metrics record (a JSON object with an int "step"): '
                       f'{line[:200]!r}.')
    records.append({key: value if key == 'step' else _decode(value) for key, value in record.items()})
  return records
