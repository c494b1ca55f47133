"""rmjax's cost against sequence length, batch and ensemble size: table, PNG, fitted exponents.

For each (step, dimension) one rmjax process compiles the step at every multiplier and times
them in interleaved rounds. The exponent is the least-squares slope of log(median time) on
log(multiplier); the FLOP exponent is the same fit of the analytic FLOP count
(`common.rm_step_flops`, `common.grpo_flops` plus the scoring ensemble's forward pass).
Targets: exponent <= 1.1 in batch and K; in sequence length, within 10% of the FLOP exponent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common

MULTIPLIERS = {'seq': (1, 2, 4), 'batch': (1, 2, 4, 8), 'members': (1, 2, 4, 8)}


def rm_point(size: str, dim: str, m: int) -> tuple[dict, int]:
  from benchmarks.run import RM
  pairs, seq_len, k = RM['pairs'], RM['seq_len'], 1
  if dim == 'seq':
    seq_len *= m
  elif dim == 'batch':
    pairs *= m
  else:
    k = m
  s = common.shape(size)
  params = dict(workload='rm', size=size, pairs=pairs, seq_len=seq_len, members=k, kind='full',
                grad_accum_steps='auto')  # as the RM job runs it (and as the benchmark's RM rows)
  return params, k * common.rm_step_flops(s, pairs, seq_len)


def rl_point(size: str, dim: str, m: int) -> tuple[dict, int]:
  from benchmarks.run import GRPO
  p = dict(GRPO)
  k = 1
  if dim == 'seq':
    p['prompt_len'] *= m
    p['new_tokens'] *= m
  elif dim == 'batch':
    p['prompts_per_step'] *= m
  else:
    k = m
  s = common.shape(size)
  rows = p['prompts_per_step'] * p['group']
  length = p['prompt_len'] + p['new_tokens']
  flops = (common.grpo_flops(s, rows, p['prompt_len'], p['new_tokens']) +
           k * common.forward_flops(s, rows, length, 1, 1))
  return dict(workload='grpo', size=size, scorer_members=k, **p), flops


def fit(x, y) -> float:
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def sweep(args, log_dir: Path, png: Path) -> dict:
  from benchmarks.run import Proc, stats, steps_for
  size = args.scaling_size
  rows = []
  print(f'\n== scaling sweep [{size}] (rmjax)', flush=True)
  for step, point in (('RM step', rm_point), ('GRPO iteration', rl_point)):
    for dim, mults in MULTIPLIERS.items():
      proc = Proc('rmjax', log_dir, args.huge_pages)
      times, flops = {m: [] for m in mults}, {}
      try:
        steps = {}
        for m in mults:
          params, flops[m] = point(size, dim, m)
          proc.call('setup', key=str(m), **params)
          steps[m] = steps_for(proc.call('time', steps=1, key=str(m))['times'][0], args.round_seconds / 2)
        for r in range(args.repeats):
          for m in (mults if r % 2 == 0 else mults[::-1]):
            times[m] += proc.call('time', steps=steps[m], key=str(m))['times']
      except Exception as e:  # one failing sweep does not stop the others
        print(f'  {step} / {dim}: FAILED {e}', flush=True)
        continue
      finally:
        proc.close()
      med = [stats(times[m])['median_s'] for m in mults]
      row = {'step': step, 'dimension': dim, 'multipliers': list(mults), 'median_s': med,
             'p25_s': [stats(times[m])['p25_s'] for m in mults], 'p75_s': [stats(times[m])['p75_s'] for m in mults],
             'flops': [flops[m] for m in mults], 'time_exponent': fit(mults, med),
             'flop_exponent': fit(mults, [flops[m] for m in mults])}
      rows.append(row)
      print(f'  {step:15s} {dim:8s} x{list(mults)}: {[round(t * 1e3, 1) for t in med]} ms, exponent '
            f'{row["time_exponent"]:.2f} (FLOPs {row["flop_exponent"]:.2f})', flush=True)
  plot(rows, png, size)
  return {'size': size, 'rows': rows, 'plot': str(png)}


def plot(rows: list[dict], png: Path, size: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  dims = list(MULTIPLIERS)
  fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), sharey=False)
  for ax, dim in zip(axes, dims):
    for row in (r for r in rows if r['dimension'] == dim):
      x, y = np.array(row['multipliers']), np.array(row['median_s']) * 1e3
      err = np.array([y - np.array(row['p25_s']) * 1e3, np.array(row['p75_s']) * 1e3 - y])
      line = ax.errorbar(x, y, yerr=np.maximum(err, 0), marker='o', capsize=3,
                         label=f'{row["step"]} (slope {row["time_exponent"]:.2f})')
      f = np.array(row['flops'], float)
      ax.plot(x, y[0] * f / f[0], ls='--', color=line[0].get_color(), alpha=0.6,
              label=f'∝ FLOPs (slope {row["flop_exponent"]:.2f})')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel({'seq': 'sequence length ×', 'batch': 'batch ×', 'members': 'ensemble size K'}[dim])
    ax.set_ylabel('ms per step (median, p25–p75)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f'rmjax cost scaling, {size} (2 CPU threads)')
  fig.tight_layout()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png, dpi=110)
  plt.close(fig)
