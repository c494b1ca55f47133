"""Markdown tables from a results JSON: `python -m benchmarks.report [results.json]`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _ms(x: float) -> str:
  return f'{x * 1e3:.1f}' if x < 10 else f'{x * 1e3:.0f}'


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
              '(TFLOP/s and mode in brackets; `benchmarks/common.py:PEAK_TFLOPS`); beside the peak RSS, the '
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
        fl += f'; MFU {r["mfu"]["fraction"]:.1%} of {r["mfu"]["peak_tflops"]:g} ({r["mfu"]["mode"]})'
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
  return '\n'.join(lines)


if __name__ == '__main__':
  path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / 'results' / 'latest.json'
  print(markdown(json.loads(path.read_text())))
