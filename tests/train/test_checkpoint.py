"""Tests for rmjax.train.checkpoint: round trip, keep-N, damage fallback, kill safety, no pickle."""
import gc
import hashlib
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import textwrap
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.train import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

# A failed tensorstore read leaves a callback for orbax's closed event loop; Python reports it as unraisable.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


class _OptState(typing.NamedTuple):
  count: jax.Array
  mu: dict


def _state(seed: int) -> dict:
  """A small train-state-like pytree with several dtypes and node kinds; values depend on `seed`."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((3, 5)).astype(np.float32)
  w[0, 0] = -0.0  # the sign of zero must survive
  w[0, 1] = np.float32(1e-40)  # a subnormal must survive
  return {
      'params': {'w': jnp.asarray(w), 'b': jnp.asarray(rng.standard_normal(5), jnp.bfloat16)},
      'opt': _OptState(count=jnp.int32(seed), mu={'w': jnp.asarray(w * 2)}),
      'layers': [jnp.arange(4, dtype=jnp.int32) * seed, jnp.full((2, 1), seed, jnp.uint8)],
      'step': jnp.int32(seed * 10),
      'rng': jax.random.key_data(jax.random.key(seed)),
  }


def _metadata(seed: int) -> dict:
  return {
      'model': {'name': 'tiny', 'width': 64},
      'reward_norm': {'mean': [0.25, -1.5], 'std': [1.0, 2.0]},
      'note': 'ünïcode',
      'seed': seed,
      'iterator': {'position': seed * 3, 'files': ['a', 'b']},
      'flag': None,
  }


def _abstract(state):
  sharding = jax.sharding.NamedSharding(jax.make_mesh((1,), ('data',)), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.tobytes() == w.tobytes()


def _damage_state_files(step_dir: pathlib.Path, how: str) -> None:
  """Truncates to half or deletes the array data files of `step_dir`'s state (the OCDBT `d/` folder)."""
  files = sorted(p for p in (step_dir / 'state' / 'd').iterdir() if p.is_file())
  assert files, f'no array files found under {step_dir}'
  for f in files:
    if how == 'truncate':
      with open(f, 'r+b') as fh:
        fh.truncate(f.stat().st_size // 2)
    else:
      f.unlink()


def test_round_trip_is_bitwise_with_metadata(tmp_path):
  state, metadata = _state(1), _metadata(1)
  with ckpt_lib.Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(7, state, metadata)
  restored = ckpt_lib.Checkpointer(tmp_path).restore(_abstract(state))
  assert restored is not None
  got_state, got_metadata, step = restored
  assert step == 7
  assert got_metadata == metadata
  _assert_bitwise_equal(got_state, state)
  assert isinstance(got_state['opt'], _OptState)
  mesh_sharding = _abstract(state)['params']['w'].sharding
  assert got_state['params']['w'].sharding == mesh_sharding


def test_restore_places_leaves_without_sharding_and_typed_keys(tmp_path):
  """jax.eval_shape gives no sharding: leaves go to the first device; a typed PRNG key round-trips."""
  state = {'w': jnp.arange(6.0).reshape(2, 3), 'key': jax.random.key(5)}
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, {})
    got, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
  assert got['w'].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  np.testing.assert_array_equal(np.asarray(got['w']), np.asarray(state['w']))
  assert jax.dtypes.issubdtype(got['key'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got['key']), jax.random.key_data(state['key']))


def test_keep_n_and_step_order(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, async_save=True)
  for step in (1, 2, 3, 4):
    assert ckpt.save(step, _state(step), _metadata(step))
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4] == ckpt_lib.saved_steps(tmp_path)
  assert ckpt.latest_step() == 4
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '4']
  # Not newer than the latest readable step: skipped unless forced; forcing replaces the steps >= it.
  assert not ckpt.save(4, _state(40), _metadata(40))
  assert not ckpt.save(2, _state(2), _metadata(2))
  assert ckpt.all_steps() == [3, 4]
  assert ckpt.save(4, _state(40), _metadata(40), force=True)
  ckpt.wait()
  _, metadata, step = ckpt_lib.Checkpointer(tmp_path).restore(_abstract(_state(0)))
  assert (step, metadata['seed']) == (4, 40)
  assert ckpt.save(2, _state(2), _metadata(2), force=True)  # a rollback: 3 and 4 are deleted
  ckpt.close()
  assert ckpt.all_steps() == [2]


@pytest.mark.parametrize('how', ['truncate', 'delete', 'metadata'])
def test_damaged_latest_falls_back_then_raises(tmp_path, how):
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(10, _state(1), _metadata(1))
    ckpt.save(20, _state(2), _metadata(2))
  if how == 'metadata':
    meta_file = tmp_path / '20' / 'metadata' / 'metadata'
    meta_file.write_text(meta_file.read_text()[:10])
  else:
    _damage_state_files(tmp_path / '20', how)

  ckpt = ckpt_lib.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 20  # finalized, but damaged
  with pytest.warns(RuntimeWarning, match=r'checkpoint step 20 .* could not be restored'):
    state, metadata, step = ckpt.restore(_abstract(_state(0)))
  assert step == 10 and metadata == _metadata(1)
  _assert_bitwise_equal(state, _state(1))
  with pytest.warns(RuntimeWarning, match='checkpoint step 20'):
    _, loaded_metadata = ckpt_lib.load(tmp_path)
  assert loaded_metadata == _metadata(1)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'tried steps \[20\]'), pytest.warns(RuntimeWarning):
    ckpt.restore(_abstract(_state(0)), step=20)

  _damage_state_files(tmp_path / '10', 'delete')
  with pytest.warns(RuntimeWarning), pytest.raises(ckpt_lib.CheckpointError, match=r'step 20:.*\n.*step 10:'):
    ckpt.restore(_abstract(_state(0)))
  gc.collect()  # orbax's abandoned read coroutines are reported here, under this module's filter


def test_resumed_run_replaces_the_damaged_newer_step(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, _state(step), _metadata(step))
  _damage_state_files(tmp_path / '30', 'delete')
  ckpt = ckpt_lib.Checkpointer(tmp_path)
  with pytest.warns(RuntimeWarning, match='checkpoint step 30'):
    assert ckpt.restore(_abstract(_state(0)))[2] == 20
  assert not ckpt.save(15, _state(15), _metadata(15))  # step 20 is readable and newer: skipped
  assert ckpt.save(25, _state(25), _metadata(25))  # only the unreadable step 30 is in the way
  ckpt.close()
  assert ckpt.all_steps() == [10, 20, 25]
  _, metadata, step = ckpt_lib.Checkpointer(tmp_path).restore(_abstract(_state(0)))
  assert (step, metadata['seed']) == (25, 25)


def test_load_needs_no_target(tmp_path):
  state, metadata = _state(3), _metadata(3)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, _state(2), _metadata(2))
    ckpt.save(9, state, metadata)
  for path in (tmp_path / '9', tmp_path):  # a step folder, and the manager folder (its latest step)
    tree, got_metadata = ckpt_lib.load(path)
    assert got_metadata == metadata
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
    # NamedTuples come back as dicts of their fields and tuples/lists as lists.
    want = dict(state, opt={'count': state['opt'].count, 'mu': state['opt'].mu})
    _assert_bitwise_equal(tree, want)
  tree, got_metadata = ckpt_lib.load(tmp_path / '5')
  assert got_metadata['seed'] == 2
  with pytest.raises(ValueError, match='neither a checkpoint step folder'):
    ckpt_lib.load(tmp_path / '9' / 'metadata')


def test_no_pickle_on_restore_or_load(tmp_path, monkeypatch):
  state = _state(4)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, _metadata(4))

  def refuse(*args, **kwargs):
    raise AssertionError('pickle used on a checkpoint load path')

  monkeypatch.setattr(pickle, 'load', refuse)
  monkeypatch.setattr(pickle, 'loads', refuse)
  monkeypatch.setattr(pickle, 'Unpickler', refuse)
  restored, _, _ = ckpt_lib.Checkpointer(tmp_path).restore(_abstract(state))
  _assert_bitwise_equal(restored, state)
  tree, _ = ckpt_lib.load(tmp_path / '1')
  np.testing.assert_array_equal(tree['params']['w'], np.asarray(state['params']['w']))


_KILL_CHILD = textwrap.dedent('''
    import os, pathlib, signal, sys, time
    import jax.numpy as jnp
    from rmjax.train import checkpoint as ckpt_lib
    root = pathlib.Path(sys.argv[1])
    ckpt = ckpt_lib.Checkpointer(root, async_save=True)
    ckpt.save(1, {'w': jnp.full((8,), 1.0)}, {'step': 1})
    ckpt.wait()
    big = {'w': jnp.ones((8,)), 'big': jnp.arange(24 * 2**20, dtype=jnp.float32)}  # 96 MiB
    assert ckpt.save(2, big, {'step': 2})
    # orbax creates the temporary folder in the background too: kill -9 once it exists.
    deadline = time.time() + 30
    while not any(p.name.startswith('2.') for p in root.iterdir()) and time.time() < deadline:
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
''')


def test_kill_during_async_save_leaves_previous_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _KILL_CHILD, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == -9, proc.stderr[-3000:]
  names = sorted(p.name for p in tmp_path.iterdir())
  assert '1' in names and '2' not in names, names
  assert any(n.startswith('2.orbax-checkpoint-tmp') for n in names), names  # killed mid-write

  ckpt = ckpt_lib.Checkpointer(tmp_path)
  assert ckpt.all_steps() == [1]
  state, metadata, step = ckpt.restore({'w': jax.ShapeDtypeStruct((8,), jnp.float32)})
  assert step == 1 and metadata == {'step': 1}
  np.testing.assert_array_equal(np.asarray(state['w']), np.ones(8, np.float32))
  # Opening the directory removes the half-written folder (in the background, done before a save).
  assert ckpt.save(2, {'w': jnp.full((8,), 2.0)}, {'step': 2})
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


_SHARDED_CHILD = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rmjax.train import checkpoint as ckpt_lib
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ('data', 'model'))
    sharding = NamedSharding(mesh, P('data', 'model'))
    target = {'w': jax.ShapeDtypeStruct((8, 6), np.float32, sharding=sharding)}
    state, _, _ = ckpt_lib.Checkpointer(sys.argv[1]).restore(target)
    assert state['w'].sharding == sharding, state['w'].sharding
    assert len(state['w'].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(state['w']), np.arange(48, dtype=np.float32).reshape(8, 6))
    print('OK')
''')


def test_restore_onto_a_mesh_of_eight_devices(tmp_path):
  """Saved from one device here, restored sharded over a 4x2 mesh of 8 forced CPU devices."""
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {'w': jnp.arange(48, dtype=jnp.float32).reshape(8, 6)}, {})
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', _SHARDED_CHILD, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]


def test_target_mismatch_raises_without_fallback(tmp_path, monkeypatch):
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
    ckpt.save(2, _state(2), _metadata(2))
  ckpt = ckpt_lib.Checkpointer(tmp_path)

  reads = []  # a mismatch must be found from the saved metadata, before any array is read
  read_arrays = ckpt._manager.restore

  def counted_read(*args, **kwargs):
    reads.append(args)
    return read_arrays(*args, **kwargs)

  monkeypatch.setattr(ckpt._manager, 'restore', counted_read)
  wrong_shape = dict(_abstract(_state(0)), step=jax.ShapeDtypeStruct((2,), jnp.int32))
  missing_leaf = {k: v for k, v in _abstract(_state(0)).items() if k != 'rng'}
  for target, message in ((wrong_shape, r'step 2 .* does not match .*step: saved \(\), abstract_state \(2,\)'),
                          (missing_leaf, r"in the checkpoint but not in abstract_state: \['rng'\]")):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      with pytest.raises(ckpt_lib.TargetMismatchError, match=message):
        ckpt.restore(target)
    assert not [w for w in caught if 'could not be restored' in str(w.message)]  # no fallback
    del caught
  assert not ckpt.save(1, _state(1), _metadata(1))  # the steps are not taken for damaged ones
  assert ckpt.all_steps() == [1, 2]
  assert not reads


def test_bad_inputs_name_the_fix(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  assert ckpt.restore(_abstract(_state(0))) is None and ckpt.latest_step() is None
  with pytest.raises(ValueError, match='JSON-serializable'):
    ckpt.save(1, _state(1), {'array': np.zeros(2)})
  with pytest.raises(ValueError, match='must be a dict'):
    ckpt.save(1, _state(1), [1, 2])
  with pytest.raises(ValueError, match=r"zero-size.*\['b'\]\[1\]"):
    ckpt.save(1, {'a': jnp.ones(2), 'b': [jnp.ones(1), jnp.zeros((3, 0))]}, {})
  with pytest.raises(ValueError, match='non-negative int'):
    ckpt.save(-1, _state(1), {})
  with pytest.raises(ValueError, match='max_to_keep'):
    ckpt_lib.Checkpointer(tmp_path / 'other', max_to_keep=0)
  ckpt.save(1, _state(1), {})
  with pytest.raises(ValueError, match=r'finalized steps: \[1\]'):
    ckpt.restore(_abstract(_state(0)), step=3)
  with pytest.raises(ValueError, match='neither a checkpoint step folder'):
    ckpt_lib.load(tmp_path / 'missing')
  ckpt.close()


def test_config_hash_is_canonical_and_stable():
  # Independent route: the canonical form written out by hand.
  want = hashlib.sha256(b'{"a":1,"b":{"c":[1,2.5],"d":"x"}}').hexdigest()[:12]
  assert ckpt_lib.config_hash('{"b": {"d": "x", "c": [1, 2.5]}, "a": 1}') == want
  assert ckpt_lib.config_hash(json.dumps({'a': 1, 'b': {'c': [1, 2.5], 'd': 'x'}}, indent=2)) == want
  assert ckpt_lib.config_hash('{"a": 2, "b": {"c": [1, 2.5], "d": "x"}}') != want
  with pytest.raises(ValueError, match='not valid JSON'):
    ckpt_lib.config_hash('{a: 1}')


def test_code_version():
  version = ckpt_lib.code_version()
  import rmjax  # pylint: disable=import-outside-toplevel
  assert version['rmjax'] == rmjax.__version__
  assert re.fullmatch(r'[0-9a-f]{40}', version['git_commit'])  # the tests run in a git checkout
  assert isinstance(version['git_dirty'], bool)
  json.dumps(version)
