"""XLA's fp32 dots beside PyTorch's at a size's shapes: `python -m benchmarks.dots --size small` (docs/benchmarks.md, item 16).

Where both frameworks are bound by their matmul kernels, the ratio of the RM step's times follows the ratio of
their dots. This times the dots alone: the RM step's `gate_up` in `'auto'` microbatches (`MICROBATCH_TOKENS`
rows) as the forward, input-gradient and weight-gradient shapes, decoding's dense dots and LM head at the
generation workload's rows, and a 2048³ dot. Each framework runs in its harness worker (2 threads, same process
environment, `benchmarks.run`), in `--repeats` rounds that alternate which goes first; it prints the median
GFLOP/s per shape and XLA / PyTorch. Shapes are `[M, K] × [K, N]` with both operands in row-major order.
Each dot is one call of its framework, so the call's own overhead is in its time (jax's dispatch of a
compiled program, some µs): at `tiny`'s decoding shapes, dots of well under 1 MFLOP, it is most of XLA's time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common, run
from rmjax.train import accumulate

FRAMEWORKS = ('rmjax', 'torch')


def shapes(s: common.Shape) -> dict[str, list[int]]:
  """`{label: [M, K, N]}` of the dots to compare at shape `s`."""
  t, d, f2, rows = accumulate.MICROBATCH_TOKENS, s.width, 2 * s.mlp, run.GEN['rows']
  dots = {'RM gate_up forward': [t, d, f2], 'RM gate_up input gradient': [t, f2, d],
          'RM gate_up weight gradient': [d, t, f2], 'decode qkv': [rows, d, (s.heads + 2 * s.kv_heads) * s.head_dim],
          'decode gate_up': [rows, d, f2], 'decode down': [rows, s.mlp, d], 'decode LM head': [rows, d, s.vocab]}
  out = {f'{name} [{m}, {k}] × [{k}, {n}]': [m, k, n] for name, (m, k, n) in dots.items()}
  return dict(out, **{f'{run.SQUARE}³': [run.SQUARE] * 3})


def table(dots: dict[str, list[int]], times: dict[str, dict[str, list[float]]], labels: dict[str, str]) -> str:
  """Markdown: median GFLOP/s of each framework's dot (2·M·K·N FLOPs a call) and XLA / PyTorch."""
  lines = [f'| dot | {labels["rmjax"]} GFLOP/s | {labels["torch"]} GFLOP/s | XLA / PyTorch |', '|---|---|---|---|']
  for name, (m, k, n) in dots.items():
    rate = {f: 2 * m * k * n / np.median(times[f][name]) / 1e9 for f in FRAMEWORKS}
    lines.append(f'| {name} | {rate["rmjax"]:.0f} | {rate["torch"]:.0f} | {rate["rmjax"] / rate["torch"]:.2f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='small', help='tiny, small or base')
  ap.add_argument('--repeats', type=int, default=5, help='rounds, each timing every dot in both frameworks')
  ap.add_argument('--no-huge-pages', dest='huge_pages', action='store_false',
                  help="the workers on the machine's default malloc (as `benchmarks.run --no-huge-pages`)")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    raise SystemExit('--repeats must be at least 1.')
  dots = shapes(common.shape(args.size))
  procs, labels, times = {}, {}, {f: {name: [] for name in dots} for f in FRAMEWORKS}
  try:
    for f in FRAMEWORKS:
      procs[f] = run.Proc(f, Path(tempfile.mkdtemp(prefix='rmjax-dots-')), args.huge_pages)
      labels[f] = procs[f].call('setup_dots', shapes=dots)['framework']
    for r in range(args.repeats):
      for f in FRAMEWORKS[r % 2:] + FRAMEWORKS[:r % 2]:
        run.wait_idle([procs[o].p.pid for o in FRAMEWORKS if o != f])
        for name, t in procs[f].call('time_dots')['times'].items():
          times[f][name] += t
  finally:
    for p in procs.values():
      p.close()
  print(f'{args.size}: fp32 dots, {common.THREADS} threads each, median of {args.repeats} rounds '
        f'({run.machine()["cpu"]})\n')
  print(table(dots, times, labels))
  return 0


if __name__ == '__main__':
  sys.exit(main())
