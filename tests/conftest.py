"""Test-wide settings: fast XLA:CPU compilation, a persistent compilation cache, a bounded hypothesis profile.

The tests' programs are tiny, so their time is mostly compilation: LLVM at optimization level 0
and XLA:CPU's older (non-"fusion emitter") code generation compile an RL iteration in 1.7 s
instead of 6.3 s here and run it as fast. Set in the environment before jax starts, so the
subprocesses the tests launch (jobs, 8-device and multi-process checks) inherit it.
"""
import os
import pathlib

_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *(
    f for f in _FAST_COMPILE if f.split('=')[0] not in os.environ.get('XLA_FLAGS', ''))]).strip()

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

_CACHE = pathlib.Path(os.environ.get('RMJAX_TEST_CACHE', pathlib.Path(__file__).parent.parent / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', str(_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

settings.register_profile('rmjax', max_examples=30, deadline=None, derandomize=True)
settings.load_profile('rmjax')
