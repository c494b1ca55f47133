"""Test-wide settings: a persistent XLA compilation cache and a bounded hypothesis profile."""
import os
import pathlib

import jax
from hypothesis import settings

_CACHE = pathlib.Path(os.environ.get('RMJAX_TEST_CACHE', pathlib.Path(__file__).parent.parent / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', str(_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

settings.register_profile('rmjax', max_examples=30, deadline=None, derandomize=True)
settings.load_profile('rmjax')
