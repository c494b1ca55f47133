"""Self-describing, fault-tolerant orbax checkpoints.

A checkpoint directory (the "manager folder") holds one folder per saved step::

  DIR/
    100/                     a finalized step
      _CHECKPOINT_METADATA   orbax's step record (timestamps, item handlers)
      state/                 the state pytree (orbax PyTree, OCDBT + tensorstore)
      metadata/metadata      the metadata dict as JSON
    200.orbax-checkpoint-tmp/  a step being written (invisible to readers)

Atomicity (checked in orbax-checkpoint 0.12.8, `orbax/checkpoint/_src/path/atomicity.py`): a save
writes everything into `<step>.orbax-checkpoint-tmp/` and, once every file is committed, renames it
to `<step>/` in one `rename` (`AtomicRenameTemporaryPath`, the default on local and POSIX file
systems; on GCS orbax writes a `commit_success.txt` marker last instead). Readers here list only
finalized step folders, so a process killed during a save leaves the previous step intact and the
half-written folder is skipped; the next `Checkpointer` opened on the directory removes it in the
background (finished before that `Checkpointer`'s first save).

A step folder is self-describing: `load(path)` returns its arrays (as numpy) and its metadata with no
abstract target and no other file. Nothing on a restore or load path uses pickle: arrays are read by
tensorstore from OCDBT, the tree structure and metadata from JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import rmjax

PyTree = Any

STATE_ITEM = 'state'
METADATA_ITEM = 'metadata'
_ITEM_NAMES = (STATE_ITEM, METADATA_ITEM)

_MAX_ERROR_CHARS = 600  # tensorstore errors carry a long JSON spec; the head names the file and the fault

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No finalized checkpoint in a directory could be restored."""


class TargetMismatchError(ValueError):
  """A readable checkpoint does not match the `abstract_state` given to `restore`."""


def _check_metadata(metadata: dict) -> None:
  """Raises a ValueError unless `metadata` is a dict that JSON can write."""
  if not isinstance(metadata, dict):
    raise ValueError(f'checkpoint metadata must be a dict, got {type(metadata).__name__}.')
  bad_keys = [k for k in metadata if not isinstance(k, str)]
  if bad_keys:
    raise ValueError(f'checkpoint metadata keys must be strings; got {bad_keys!r}.')
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'checkpoint metadata must be JSON-serializable (dicts, lists, str, int, float, bool, None): {e}. '
        'Convert arrays with .tolist() and dataclasses / ConfigDicts with .to_dict() first.') from e


def _check_state(state: PyTree) -> None:
  """Raises a ValueError naming any zero-size array leaf (orbax 0.12.8 cannot save those)."""
  empty = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
           if getattr(leaf, 'size', 1) == 0]
  if empty:
    raise ValueError(f'orbax cannot save zero-size arrays; the state has zero-size leaves at {empty}: '
                     'drop them from the state or give them at least one element.')


def _abstract_leaf(leaf: Any, default_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
  """A `ShapeDtypeStruct` with a sharding: the leaf's own, else `default_sharding`."""
  if not (hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')):
    raise ValueError(
        f'abstract_state leaves must be jax.ShapeDtypeStruct or arrays, got {type(leaf).__name__}; '
        'build the target with jax.eval_shape(init_fn, ...).')
  sharding = getattr(leaf, 'sharding', None) or default_sharding
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _saved_shape(leaf: jax.ShapeDtypeStruct) -> tuple[int, ...]:
  """The shape a leaf is stored with: a typed PRNG key array is stored as its uint32 key data."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(leaf.shape)


def _describe_mismatch(target: PyTree, state_dir: pathlib.Path) -> str | None:
  """How the array leaves (names, shapes) of `target` differ from those saved in `state_dir`; None if alike.

  Reads only the saved tree metadata (JSON); raises if that cannot be read.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved_tree = handler.metadata(state_dir).tree
  finally:
    handler.close()
  saved = {name: tuple(m.shape) for name, m in ocp.tree.to_flat_dict(saved_tree, sep='.').items()
           if hasattr(m, 'shape')}
  wanted = {name: _saved_shape(leaf) for name, leaf in ocp.tree.to_flat_dict(target, sep='.').items()
            if isinstance(leaf, jax.ShapeDtypeStruct)}
  problems = []
  if missing := sorted(wanted.keys() - saved.keys()):
    problems.append(f'not in the checkpoint: {missing}')
  if extra := sorted(saved.keys() - wanted.keys()):
    problems.append(f'in the checkpoint but not in abstract_state: {extra}')
  problems += [f'{name}: saved {saved[name]}, abstract_state {wanted[name]}'
               for name in sorted(wanted.keys() & saved.keys()) if saved[name] != wanted[name]]
  return '; '.join(problems) or None


def _finalized_steps(directory: pathlib.Path) -> list[int]:
  """Finalized step numbers under `directory`, ascending (temporary folders excluded)."""
  if not directory.is_dir():
    return []
  return sorted(ocp.step.checkpoint_steps(directory))


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """The finalized steps of a checkpoint folder (a `Checkpointer`'s directory), ascending."""
  return _finalized_steps(pathlib.Path(directory))


def _first_restorable(directory: pathlib.Path, steps: Sequence[int], restore_fn) -> tuple[Any, int, list[int]]:
  """Calls `restore_fn(step)` on `steps` from newest to oldest until one succeeds.

  Returns `(result, step, failed_steps)`. A step that fails is skipped with a warning naming the
  step and the error. Raises `CheckpointError` listing every failure if none can be restored.
  """
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      return restore_fn(step), step, [s for s, _ in failures]
    except TargetMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any damage must fall through to an older step
      error = f'{type(e).__name__}: {e}'
      if len(error) > _MAX_ERROR_CHARS:
        error = error[:_MAX_ERROR_CHARS] + ' ...'
      message = f'checkpoint step {step} in {directory} could not be restored ({error}); skipping it.'
      _log.warning(message)
      warnings.warn(message, RuntimeWarning, stacklevel=3)
      failures.append((step, error))
  raise CheckpointError(
      f'no checkpoint in {directory} could be restored (tried steps {sorted(steps, reverse=True)}):\n'
      + '\n'.join(f'  step {s}: {error}' for s, error in failures))


class Checkpointer:
  """Saves and restores (state, metadata) pairs per step in one directory, keeping the newest N.

  `state` is any pytree of jax or numpy arrays (params, optimizer state, step counter, RNG keys: orbax
  0.12.8 saves typed `jax.random.key` arrays as well as their `key_data`). `metadata` is a JSON-able
  dict written beside it in the same step (model config, tokenizer, reward statistics, run config
  and its `config_hash`, `code_version()`, data iterator state).

  With `async_save=True`, `save` returns once the arrays are copied off the device to host memory,
  so the caller may donate or overwrite them at once; files are written in a background thread and
  the step becomes visible only when finalized (see the module docstring). `wait()` / `close()`
  block until pending saves are finalized.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f'max_to_keep must be an int >= 1, got {max_to_keep!r}.')
    self._directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self._directory, item_names=_ITEM_NAMES, options=options)
    self._unreadable: set[int] = set()  # finalized steps that `restore` could not read

  @property
  def directory(self) -> pathlib.Path:
    return self._directory

  def save(self, step: int, state: PyTree, metadata: dict, *, force: bool = False) -> bool:
    """Starts saving `state` and `metadata` as step `step`; returns whether a save was started.

    A step newer than every finalized step is always saved. Otherwise the finalized steps >= `step`
    stand in the way: if `restore` found all of them unreadable they are deleted and the save goes
    ahead (a run resumed from an older step after a damaged newest one); if any of them is readable
    the call returns False and writes nothing, unless `force=True`, which deletes them first (a
    deliberate rollback or overwrite; a kill during that save leaves only the older steps).

    Raises:
      ValueError: a negative step, a zero-size array leaf, or metadata that JSON cannot write.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f'step must be a non-negative int, got {step!r}.')
    step = int(step)
    _check_state(state)
    _check_metadata(metadata)
    self._manager.wait_until_finished()
    in_the_way = [s for s in self.all_steps() if s >= step]
    if in_the_way:
      if not force and not set(in_the_way) <= self._unreadable:
        return False
      self._manager.reload()
      for s in in_the_way:
        self._manager.delete(s)
      self._unreadable.difference_update(in_the_way)
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        METADATA_ITEM: ocp.args.JsonSave(metadata),
    })
    return self._manager.save(step, args=args, force=True)

  def all_steps(self) -> list[int]:
    """Finalized steps on disk, ascending (a save in flight is not listed until finalized)."""
    return _finalized_steps(self._directory)

  def latest_step(self) -> int | None:
    """The newest finalized step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict, int] | None:
    """Restores `(state, metadata, step)`; None when the directory holds no finalized checkpoint.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(init)`) with the
        structure, shapes and dtypes of the saved state; each leaf's `.sharding` says where its
        array is placed (a leaf without one goes to the first local device).
      step: the step to restore; by default the newest finalized step that can be read. A newest
        step whose files are damaged is skipped with a warning naming the step and the error, and
        the next older one is tried.

    A step whose saved tree metadata shows other array names or shapes than `abstract_state`
    raises `TargetMismatchError` at once, naming the differences, with no fallback (a differing
    dtype is a cast, not a mismatch); any other failure to read a step counts as damage.

    Raises:
      ValueError: `step` is given but is not a finalized step.
      TargetMismatchError: the step being read was saved with other leaves or shapes.
      CheckpointError: no finalized step could be read (each step's error is listed).
    """
    steps = self.all_steps()
    if not steps:
      return None
    if step is not None:
      if step not in steps:
        raise ValueError(f'no finalized checkpoint for step {step} in {self._directory}; '
                         f'finalized steps: {steps}.')
      steps = [step]
    default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: _abstract_leaf(leaf, default_sharding), abstract_state)

    def restore_step(s: int) -> tuple[PyTree, dict]:
      # The saved layout is compared first, from its metadata alone: a mismatch is named before any
      # array is read (and no read is left half done). Unreadable metadata counts as damage.
      mismatch = _describe_mismatch(target, self._directory / str(s) / STATE_ITEM)
      if mismatch is not None:
        raise TargetMismatchError(
            f'checkpoint step {s} in {self._directory} does not match abstract_state (another model, '
            f'optimizer or state layout?): {mismatch}')
      restored = self._manager.restore(s, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(target),
          METADATA_ITEM: ocp.args.JsonRestore(),
      }))
      return restored[STATE_ITEM], restored[METADATA_ITEM]

    try:
      (state, metadata), restored_step, failed = _first_restorable(self._directory, steps, restore_step)
    except CheckpointError:
      self._unreadable.update(steps)
      raise
    self._unreadable.update(failed)
    return state, metadata, restored_step

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is finalized (raises if one failed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finalizes pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _load_step(step_dir: pathlib.Path) -> tuple[PyTree, dict]:
  """Reads one finalized step folder: the state tree as numpy arrays and the metadata dict."""
  state_dir = step_dir / STATE_ITEM
  tree_handler = ocp.PyTreeCheckpointHandler()
  try:
    tree_metadata = tree_handler.metadata(state_dir).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_metadata)
    state = tree_handler.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    tree_handler.close()
  metadata = ocp.JsonCheckpointHandler().restore(step_dir / METADATA_ITEM, args=ocp.args.JsonRestore())
  return state, metadata


def load(path: str | os.PathLike) -> tuple[PyTree, dict]:
  """Loads a checkpoint with nothing but its folder: returns `(state_tree, metadata)`.

  `path` is a step folder (`DIR/<step>`, holding `state/` and `metadata/`) or a manager folder
  (`DIR`): then its newest finalized step is read, falling back to older ones with a warning if
  that one is damaged. Arrays come back as numpy arrays in nested dicts / lists keyed as saved
  (a NamedTuple or dataclass node comes back as a dict of its fields). No pickle is used.
  """
  path = pathlib.Path(path).absolute()
  if (path / STATE_ITEM).is_dir():
    return _load_step(path)
  steps = _finalized_steps(path)
  if not steps:
    raise ValueError(
        f'{path} is neither a checkpoint step folder (with {STATE_ITEM}/ and {METADATA_ITEM}/ '
        'inside) nor a folder holding finalized step folders.')
  result, _, _ = _first_restorable(path, steps, lambda s: _load_step(path / str(s)))
  return result


def _git(*args: str) -> str | None:
  """Output of a git command run in the package's folder, or None when git or the repo is absent."""
  try:
    done = subprocess.run(['git', *args], cwd=pathlib.Path(rmjax.__file__).parent,
                          capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
  """`{'rmjax': __version__, 'git_commit': sha | None, 'git_dirty': bool | None}`.

  `git_dirty` is True when tracked files differ from the commit (untracked files are ignored, as in
  `git describe --dirty`); both git fields are None outside a git checkout or without git.
  """
  commit = _git('rev-parse', 'HEAD')
  status = _git('status', '--porcelain', '--untracked-files=no') if commit is not None else None
  return {
      'rmjax': rmjax.__version__,
      'git_commit': commit,
      'git_dirty': None if status is None else bool(status),
  }


def config_hash(config_json: str) -> str:
  """Stable 12-hex-digit hash of a run's config given as JSON (e.g. `ConfigDict.to_json()`).

  The JSON is parsed and re-serialized with sorted keys and no whitespace before hashing
  (`sha256(canonical)[:12]`), so key order and formatting do not change it; values do.
  """
  if not isinstance(config_json, str):
    raise ValueError(f'config_hash takes the config as a JSON string, got {type(config_json).__name__}; '
                     'pass config.to_json().')
  try:
    parsed = json.loads(config_json)
  except json.JSONDecodeError as e:
    raise ValueError(f'config_hash: the config is not valid JSON ({e}).') from e
  canonical = json.dumps(parsed, sort_keys=True, separators=(',', ':'), ensure_ascii=False)
  return hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]
