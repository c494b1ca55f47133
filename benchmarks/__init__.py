"""Side-by-side benchmarks of rmjax against TRL + transformers (PyTorch) and Tunix (JAX).

`python -m benchmarks.run` (see docs/benchmarks.md). Only `common` is shared with the peer
processes, so it needs nothing beyond the standard library and numpy.
"""
