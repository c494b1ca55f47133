"""Markdown tables from results JSONs: `python -m benchmarks.report [results.json]` (one run's tables; the
latest run without an argument) or `python -m benchmarks.report a.json b.json ...` (runs side by side);
`--plot runs.png` also draws every target, run by run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import operator
from pathlib import Path


# The targets of docs/benchmarks.md for 2 CPU cores. Speed-ups (peer time / rmjax time): (workload, size, peer,
# minimum), None meaning ahead (above 1).
SPEEDUP_TARGETS = [
    ('RM step', 'tiny', 'torch', 1.5), ('RM step', 'small', 'torch', 1.0),
    ('RM K=4 full ensemble', 'tiny', 'torch', 2.0), ('RM K=4 full ensemble', 'small', 'torch', 1.0),
    ('generation, temperature 1', 'tiny', 'torch', 5.0), ('generation, temperature 1', 'small', 'torch', 3.0),
    ('GRPO iteration', 'tiny', 'torch', 3.0), ('GRPO iteration', 'small', 'torch', 2.0),
] + [(name, size, 'tunix', None) for size in ('tiny', 'small')
     for name in ('generation, temperature 1', 'generation, top-p 0.9', 'GRPO iteration')]
DOT_FRACTION_TARGET = ('RM step [small]', 0.9)  # model FLOP/s over XLA's dot rate at the step's shape, at least
ENSEMBLE_COST_TARGET = ('RM K=4 full ensemble [small]', 'RM step [small]', 4.0)  # rmjax's time ratio, below
EXPONENT_LIMIT = 1.1  # scaling: time exponent in batch and members at most this; in sequence length this × FLOPs'
PEERS = {'torch': 'TRL + transformers', 'tunix': 'Tunix'}


def _ms(x: float) -> str:
  return f'{x * 1e3:.1f}' if x < 10 else f'{x * 1e3:.0f}'


def mfu_text(mfu: dict) -> str:
  """'MFU 20.2% of 495 TFLOP/s (tf32)' from a record's `mfu`."""
  return f'MFU {mfu["fraction"]:.1%} of {mfu["peak_tflops"]:g} TFLOP/s ({mfu["mode"]})'


def markdown(report: dict) -> str:
  m = report['machine']
  cpu = m['cpu'] + (f' (family/model {m["cpu_family_model"]}, {m["isa"]})' if 'isa' in m else '')
  malloc = ('glibc malloc on transparent huge pages' if report.get('huge_pages') else 'default malloc')
  malloc += f' (kernel THP mode {m["transparent_hugepage"]})' if 'transparent_hugepage' in m else ''
  lines = [f'Machine: {cpu}, {m["cores"]} cores, {m["threads_per_framework"]} threads per framework, {malloc}; '
           f'load average {report["load_start"]:.1f} at start, {report.get("load_end", float("nan")):.1f} at end '
           '(per workload: ' + ', '.join(f'{w["load_before"]:.1f}' for w in report['workloads']) + '); '
           'CPU time taken by the virtual machine\'s host (steal) per workload: '
           + ', '.join(f'{w["steal"]:.0%}' if 'steal' in w else '–' for w in report['workloads']) + '.',
           '', 'GFLOP/s are analytic model FLOPs per second; "of dot" divides them by XLA\'s fp32 dot rate at the '
           'step\'s largest matmul shape and "of 2048²" by a 2048³ dot, both timed after each rmjax round of '
           'the same workload (rates in the dot column). Speed-up = peer time / rmjax time (median of the '
           'per-round ratios, [min–max]).'
           + (' MFU: model FLOP/s over the nominal dense peak of the device for fp32 dots in the mode jax runs them '
              '(`benchmarks/common.py:PEAK_TFLOPS`); beside the peak RSS, the '
              'accelerator\'s peak memory in use.'
              if any('mfu' in r for w in report['workloads'] for r in w['frameworks'].values()) else ''), '',
           '| workload | framework | median ms [p25–p75] | tokens/s | GFLOP/s (of dot / of 2048²) | dot GFLOP/s: '
           'step shape, 2048² | compile s | peak RSS MB | rmjax speed-up |',
           '|---|---|---|---|---|---|---|---|---|']
  for w in report['workloads']:
    for f, r in w['frameworks'].items():
      tok = f'{r["tokens_per_s"]:.0f}' if 'tokens_per_s' in r else '–'
      fl = (f'{r["gflops_per_s"]:.1f} ({r.get("dot_fraction", float("nan")):.0%} / '
            f'{r.get("square_dot_fraction", float("nan")):.0%})') if 'gflops_per_s' in r else '–'
      if 'mfu' in r:
        fl += '; ' + mfu_text(r['mfu'])
      comp = f'{r["compile_s"]:.1f}' if r.get('compile_s') is not None else '–'
      s = r.get('speedup_vs_rmjax')
      sp = f'**{s["median"]:.2f}×** [{s["min"]:.2f}–{s["max"]:.2f}]' if s else r.get('not_compared', '')
      dots = ''
      if f == 'rmjax' and 'dots' in w:
        st, sq = w['dots']['step'], w['dots']['square_2048']
        dots = f'{st["gflops_per_s"]:.0f} ({"×".join(map(str, st["shape"]))}), {sq["gflops_per_s"]:.0f}'
      memory = f'{r["peak_rss_mb"]:.0f}' + (f' (device {r["device_peak_mb"]:.0f})' if r.get('device_peak_mb') else '')
      device = r.get('device', {'platform': 'cpu'})
      framework = r['framework'] + (f' on {device["kind"]}' if device['platform'] != 'cpu' else '')
      lines.append(f'| {w["name"]} | {framework} | {_ms(r["median_s"])} [{_ms(r["p25_s"])}–{_ms(r["p75_s"])}] | '
                   f'{tok} | {fl} | {dots} | {comp} | {memory} | {sp} |')
  for e in report.get('errors', []):
    lines.append(f'\nFAILED {e["workload"]}: {e["error"]}')
  sc = report.get('scaling')
  if sc:
    lines += ['', f'Scaling ({sc["size"]}): time per step against a multiplier of one dimension; exponent = slope '
              'of log time on log multiplier (least squares), next to the analytic FLOP count\'s.', '',
              '| step | dimension | multipliers | median ms | time exponent | FLOP exponent |', '|---|---|---|---|---|---|']
    for row in sc['rows']:
      lines.append(f'| {row["step"]} | {row["dimension"]} | {", ".join(map(str, row["multipliers"]))} | '
                   f'{", ".join(_ms(t) for t in row["median_s"])} | {row["time_exponent"]:.2f} | '
                   f'{row["flop_exponent"]:.2f} |')
    lines.append(f'\nPlot: `{sc["plot"]}`')
  against = targets(report)
  if against:
    lines += ['', 'Against the targets of docs/benchmarks.md (on 2 CPU cores):', '', against]
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
  """One target of one run: `value` must stand in `relation` ('≥', '>', '<' or '≤') to `limit`."""
  what: str  # e.g. 'RM step [tiny], speed-up vs TRL + transformers'
  text: str  # the target as written, e.g. '≥ 1.50×'
  value: float
  shown: str  # the run's number as written, e.g. '1.69×'
  limit: float
  relation: str
  spread: tuple[float, float] | None = None  # a speed-up's range over the run's rounds

  @property
  def met(self) -> bool:
    return RELATIONS[self.relation](self.value, self.limit)


RELATIONS = {'≥': operator.ge, '>': operator.gt, '<': operator.lt, '≤': operator.le}


def target_rows(report: dict) -> list[Target]:
  """Each target (`SPEEDUP_TARGETS` and the three below it) whose workload the run has."""
  frameworks = {w['name']: w['frameworks'] for w in report['workloads']}
  rows = []
  for name, size, peer, minimum in SPEEDUP_TARGETS:
    s = frameworks.get(f'{name} [{size}]', {}).get(peer, {}).get('speedup_vs_rmjax')
    if s:
      spread = (s['min'], s['max']) if 'min' in s else None
      rows.append(Target(f'{name} [{size}], speed-up vs {PEERS[peer]}', f'≥ {minimum:.2f}×' if minimum else 'ahead (> 1×)',
                         s['median'], f'{s["median"]:.2f}×', minimum or 1.0, '≥' if minimum else '>', spread))
  name, minimum = DOT_FRACTION_TARGET
  fraction = frameworks.get(name, {}).get('rmjax', {}).get('dot_fraction')
  if fraction is not None:
    rows.append(Target(f'{name}, rmjax\'s FLOP/s of the dot rate', f'≥ {minimum:.0%}', fraction, f'{fraction:.0%}',
                       minimum, '≥'))
  ensemble, single, limit = ENSEMBLE_COST_TARGET
  if 'rmjax' in frameworks.get(ensemble, {}) and 'rmjax' in frameworks.get(single, {}):
    ratio = frameworks[ensemble]['rmjax']['median_s'] / frameworks[single]['rmjax']['median_s']
    rows.append(Target(f'{ensemble}, rmjax\'s time over its {single}', f'< {limit:g}×', ratio, f'{ratio:.2f}×', limit, '<'))
  for row in report.get('scaling', {}).get('rows', []):
    seq = row['dimension'] == 'seq'
    limit = EXPONENT_LIMIT * (row['flop_exponent'] if seq else 1)
    target = f'≤ {EXPONENT_LIMIT:g} × FLOPs\' {row["flop_exponent"]:.2f} = {limit:.2f}' if seq else f'≤ {limit:g}'
    rows.append(Target(f'scaling: {row["step"]}, {row["dimension"]}, time exponent', target, row['time_exponent'],
                       f'{row["time_exponent"]:.2f}', limit, '≤'))
  return rows


def targets(report: dict) -> str:
  """Markdown table of `target_rows`: the target, the run's number, met or missed ('' when the run has none)."""
  rows = target_rows(report)
  if not rows:
    return ''
  return '\n'.join(['| | target | this run | |', '|---|---|---|---|'] + [
      f'| {t.what} | {t.text} | {t.shown} | {"met" if t.met else "**missed**"} |' for t in rows])


def plot_targets(reports: dict[str, dict], png: Path) -> list[str]:
  """One panel per target: each run's number (filled where met, open where missed; a speed-up's bar spans its
  rounds' range) against the target's limit (dashed), runs in the order given. Returns the panels' targets."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = list(reports)
  series: dict[str, list[tuple[int, Target]]] = {}
  for i, r in enumerate(reports.values()):
    for t in target_rows(r):
      series.setdefault(t.what, []).append((i, t))
  cols = 4
  rows = -(-len(series) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.6 * rows), squeeze=False)
  for ax, (what, points) in zip(axes.flat, series.items()):
    for i, t in points:
      if t.spread:
        ax.plot([i, i], t.spread, color='0.7', lw=1)
      ax.plot(i, t.value, 'o', color='C2' if t.met else 'C3', mfc='C2' if t.met else 'none')
    ax.axhline(points[-1][1].limit, color='k', ls='--', lw=0.8)
    ax.set_title(f'{what}\n(target {points[-1][1].text})', fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=6, ha='right')
    ax.tick_params(axis='y', labelsize=7)
  for ax in axes.flat[len(series):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return list(series)


def compare(reports: dict[str, dict]) -> str:
  """Runs side by side, `{run name: report}`: per workload rmjax's median step time and each peer's
  speed-up (median of the per-round ratios) in every run, then the scaling exponents and how many of the
  run's targets it met; '–' where a run lacks the number."""
  names = list(reports)
  runs = [{w['name']: w['frameworks'] for w in r['workloads']} for r in reports.values()]
  lines = ['| workload | | ' + ' | '.join(names) + ' |', '|---|---|' + '---|' * len(names)]
  for workload in dict.fromkeys(name for run in runs for name in run):
    rows = [run.get(workload, {}) for run in runs]
    lines.append(f'| {workload} | rmjax ms | '
                 + ' | '.join(_ms(r['rmjax']['median_s']) if 'rmjax' in r else '–' for r in rows) + ' |')
    for peer in dict.fromkeys(f for r in rows for f in r if f != 'rmjax'):
      ratios = [r.get(peer, {}).get('speedup_vs_rmjax') for r in rows]
      lines.append(f'| | speed-up vs {peer} | '
                   + ' | '.join(f'{s["median"]:.2f}×' if s else '–' for s in ratios) + ' |')
  scaling = [{(row['step'], row['dimension']): row for row in r.get('scaling', {}).get('rows', [])}
             for r in reports.values()]
  for key in dict.fromkeys(k for sc in scaling for k in sc):
    flops = next(sc[key]['flop_exponent'] for sc in scaling if key in sc)
    lines.append(f'| scaling: {key[0]}, {key[1]} (FLOPs {flops:.2f}) | time exponent | '
                 + ' | '.join(f'{sc[key]["time_exponent"]:.2f}' if key in sc else '–' for sc in scaling) + ' |')
  met = [[t.met for t in target_rows(r)] for r in reports.values()]
  lines.append('| targets | met | ' + ' | '.join(f'{sum(m)} of {len(m)}' for m in met) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('runs', nargs='*', type=Path, help='results JSONs (default: benchmarks/results/latest.json)')
  ap.add_argument('--plot', type=Path, help='also draw each target, run by run, to this PNG')
  args = ap.parse_args(argv)
  paths = args.runs or [Path(__file__).resolve().parent / 'results' / 'latest.json']
  unique = len({p.stem for p in paths}) == len(paths)  # runs are named by file name, else by path
  reports = {p.stem if unique else str(p): json.loads(p.read_text()) for p in paths}
  print(compare(reports) if len(paths) > 1 else markdown(next(iter(reports.values()))))
  if args.plot:
    plot_targets(reports, args.plot)
    print(f'\nPlot: {args.plot}')


if __name__ == '__main__':
  main()
