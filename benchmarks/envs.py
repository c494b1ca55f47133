"""Peer virtual environments, created on first use under `benchmarks/.venvs/`.

torch: torch 2.13.0 (CPU build, from a local wheel), transformers, trl.
tunix: google-tunix (its own jax/flax; kept apart from torch, as installing both pulls
each other back to older versions).

`python -m benchmarks.envs [torch|tunix ...]` creates them ahead of a run.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / '.venvs'
TORCH_VERSION = '2.13.0'
TORCH_WHEEL_GLOB = f'/opt/wheels/torch-{TORCH_VERSION}+cpu-*.whl'

SPECS = {
    'torch': ['transformers==5.24.0', 'trl==1.16.0', 'psutil'],
    'tunix': ['google-tunix==0.1.7', 'psutil'],
}


def torch_wheel() -> str:
  """The local CPU wheel of torch (a plain `torch` from the registry is the multi-GB CUDA build)."""
  override = os.environ.get('RMJAX_BENCH_TORCH_WHEEL')
  if override:
    return override
  found = sorted(glob.glob(TORCH_WHEEL_GLOB))
  if not found:
    raise ValueError(f'no CPU torch wheel matches {TORCH_WHEEL_GLOB}; set RMJAX_BENCH_TORCH_WHEEL to the path of '
                     f'a torch=={TORCH_VERSION} CPU wheel.')
  return found[-1]


def python(name: str) -> Path:
  """The interpreter of peer environment `name`, creating the environment if it is missing."""
  if name not in SPECS:
    raise ValueError(f'unknown peer environment {name!r}; known: {sorted(SPECS)}.')
  env = ROOT / name
  exe = env / 'bin' / 'python'
  done = env / '.installed'
  if done.exists():
    return exe
  print(f'[envs] creating {env} (once; a few minutes)', file=sys.stderr, flush=True)
  subprocess.run([sys.executable, '-m', 'venv', '--clear', str(env)], check=True)
  packages = list(SPECS[name])
  if name == 'torch':
    packages = [torch_wheel()] + packages
  subprocess.run([str(exe), '-m', 'pip', 'install', '-q', *packages], check=True)
  done.write_text(' '.join(packages) + '\n')
  return exe


if __name__ == '__main__':
  for n in sys.argv[1:] or sorted(SPECS):
    print(n, python(n))
