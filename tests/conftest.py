"""Test-wide settings: fast XLA:CPU compilation, a persistent compilation cache, a bounded hypothesis profile.

The tests' programs are tiny, so their time is mostly compilation: LLVM at optimization level 0
and XLA:CPU's older (non-"fusion emitter") code generation compile an RL iteration in 1.7 s
instead of 6.3 s here and run it as fast. Set in the environment before jax starts, so the
subprocesses the tests launch (jobs, 8-device and multi-process checks) inherit them.
"""
import os
import pathlib
import subprocess
import sys

_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *(
    f for f in _FAST_COMPILE if f.split('=')[0] not in os.environ.get('XLA_FLAGS', ''))]).strip()

# The persistent compilation cache (a program compiled once is reused by later tests and processes).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(pathlib.Path(__file__).parent.parent / '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Also in this process, should jax have been imported before the environment was set.
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
for _name, _cast in (('min_compile_time_secs', float), ('min_entry_size_bytes', int)):
  jax.config.update(f'jax_persistent_cache_{_name}', _cast(os.environ[f'JAX_PERSISTENT_CACHE_{_name.upper()}']))

settings.register_profile('rmjax', max_examples=30, deadline=None, derandomize=True)
settings.load_profile('rmjax')


@pytest.fixture(scope='session')
def world(tmp_path_factory):
  """A workdir of `python -m rmjax.main --config=configs/rm.py:test`, run once per session: base policy
  in `W/policy/checkpoints`, reward-model ensemble (K = 2) in `W/rm/checkpoints`, gold in `W/gold`,
  preference pairs in `W/data`."""
  root = pathlib.Path(__file__).parent.parent
  workdir = tmp_path_factory.mktemp('rm_world')
  # The subprocess shares the persistent compilation cache set above.
  cmd = [sys.executable, '-m', 'rmjax.main', '--config=configs/rm.py:test', f'--workdir={workdir}',
         '--config.train.progress=False', '--config.world.policy.train.progress=False']
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir
