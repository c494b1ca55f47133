"""One command for every benchmark: `python -m benchmarks.run` (docs/benchmarks.md).

Each workload runs rmjax and each peer in its own process (the peers in their own virtual
environments, `benchmarks.envs`), pinned to `common.THREADS` CPUs and thread pools. The
orchestrator then

  1. builds and warms up every framework (compile time reported apart, warm-up not timed);
  2. checks that all frameworks compute the same value on the same weights and batch (the
     RM loss before and after one optimizer step — same optimizer, lr and clipping —, or
     the prompt NLL of the LM) within `CHECK_TOL`, and stops the workload if they do not;
  3. times `--repeats` rounds, the frameworks interleaved (the order rotates each round), a
     round being several steps of one framework while the others wait;
  4. reports per framework the median step time, its spread (25th–75th percentile, min),
     tokens/s, peak RSS, compile time, model FLOP/s (analytic, `common.*_flops`) as a fraction
     of XLA's dot rate at the step's largest matmul shape and of a 2048² dot, both timed in the
     rmjax worker after each of its rounds (so under the same load), and on a GPU as a fraction of
     its nominal peak (MFU, `common.peak_tflops`), and the speed-up peer time / rmjax time (median
     and range of the per-round ratios, which cancels most of the drift of a shared machine;
     only between frameworks on the same kind of device).

Results are printed and written to `benchmarks/results/<time>.json` (and `latest.json`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common, envs
from benchmarks import report as report_lib
from launch import local

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'
CHECK_TOL = {'rm': (1e-4, 1e-3), 'generate': (1e-4,), 'grpo': (1e-4,)}
MODULES = {'rmjax': 'benchmarks.workers.rmjax_worker', 'torch': 'benchmarks.workers.torch_worker',
           'tunix': 'benchmarks.workers.tunix_worker'}
SQUARE = 2048

# Settings of shared/PERF_NOTES.md.
RM = dict(pairs=16, seq_len=128)
GEN = dict(rows=16, prompt_len=32, new_tokens=64)
GRPO = dict(prompts_per_step=8, group=4, prompt_len=32, new_tokens=32, beta=0.04, reward_token=7)


def worker_env(framework: str, huge_pages: bool) -> dict[str, str]:
  """A worker's environment: this one's without a compilation cache, with the repository first on the path
  (rmjax's worker, which runs this Python, keeps the rest of its PYTHONPATH; a peer's, in an environment of
  its own, gets none of it) and, with `huge_pages`, glibc's malloc on transparent huge pages as rmjax's
  launchers run jobs (`launch.local.point_env`; every framework alike, docs/benchmarks.md item 11)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  if framework != 'rmjax':
    env.pop('PYTHONPATH', None)
  if huge_pages:
    return local.point_env(env)
  return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')])))


class Proc:
  """A worker process speaking `common.serve`'s line protocol."""

  def __init__(self, framework: str, log_dir: Path, huge_pages: bool):
    exe = sys.executable if framework == 'rmjax' else str(envs.python(framework))
    env = worker_env(framework, huge_pages)
    self.framework = framework
    self.log = open(log_dir / f'{framework}.log', 'a')
    self.p = subprocess.Popen([exe, '-m', MODULES[framework]], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)

  def call(self, cmd: str, **kw):
    self.p.stdin.write(json.dumps(dict(kw, cmd=cmd)) + '\n')
    line = self.p.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.framework} worker died; see {self.log.name}.')
    res = json.loads(line)
    if not res.get('ok'):
      raise RuntimeError(f'{self.framework} worker: {res.get("error")} (see {self.log.name}).')
    return res

  def close(self):
    try:
      self.call('quit')
    except Exception:  # already gone
      pass
    try:
      self.p.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.p.kill()
      self.p.wait()
    self.log.close()


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process, all its threads, from /proc/<pid>/stat."""
  fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def wait_idle(pids: list[int], window: float = 0.25, busy: float = 0.05, limit: float = 60.0) -> float:
  """Waits until the processes `pids` together use under `busy` of one core over `window` seconds
  (a trainer's background thread, or a thread pool spinning after its work, would otherwise run
  during another framework's timed round); returns the seconds waited, at most `limit`."""
  start = time.perf_counter()
  while time.perf_counter() - start < limit:
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(window)
    if sum(cpu_seconds(p) for p in pids) - before < busy * window:
      break
  return time.perf_counter() - start


def loadavg() -> float:
  return float(Path('/proc/loadavg').read_text().split()[0])


def cpu_ticks() -> tuple[int, int]:
  """(steal, total) CPU ticks since boot from /proc/stat: steal is time a virtual machine's host
  gave these cores to someone else, which slows every framework and shows in no load average."""
  fields = [int(x) for x in Path('/proc/stat').read_text().splitlines()[0].split()[1:]]
  return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_fraction(start: tuple[int, int]) -> float:
  steal, total = cpu_ticks()
  return (steal - start[0]) / max(total - start[1], 1)


def machine() -> dict:
  """The CPU as /proc/cpuinfo names it, with its family / model numbers and widest vector ISA: a VM's
  "AMD EPYC" has been several generations here, with and without AVX-512, and the frameworks' kernels
  do not gain alike from it."""
  info = {}
  for line in Path('/proc/cpuinfo').read_text().splitlines():
    key, _, value = line.partition(':')
    info.setdefault(key.strip(), value.strip())
  flags = set(info.get('flags', '').split())
  isa = next((f for f in ('avx512f', 'avx2', 'avx') if f in flags), 'sse')
  return {'cpu': info.get('model name', 'unknown'),
          'cpu_family_model': f'{info.get("cpu family", "?")}/{info.get("model", "?")}',
          'isa': isa.replace('avx512f', 'avx512'), 'cores': os.cpu_count(), 'threads_per_framework': common.THREADS,
          'python': sys.version.split()[0], 'transparent_hugepage': transparent_hugepage()}


def transparent_hugepage() -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'; 'unknown' off Linux):
  `launch.local.HUGE_PAGES` takes effect under 'madvise', 'always' gives huge pages anyway, 'never' none."""
  try:
    text = Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text()
  except OSError:
    return 'unknown'
  return text.split('[', 1)[1].split(']', 1)[0] if '[' in text else text.strip()


def stats(times: list[float]) -> dict:
  t = np.asarray(times)
  return {'median_s': float(np.median(t)), 'p25_s': float(np.percentile(t, 25)), 'p75_s': float(np.percentile(t, 75)),
          'min_s': float(t.min()), 'n': int(t.size)}


def steps_for(seconds_per_step: float, budget: float) -> int:
  return int(np.clip(round(budget / max(seconds_per_step, 1e-6)), 1, 50))


def run_workload(w: dict, frameworks: list[str], args, log_dir: Path) -> dict:
  """Setup, check, interleaved timing of one workload; returns its result record."""
  print(f'\n== {w["name"]}  ({", ".join(frameworks)})', flush=True)
  load0, ticks0 = loadavg(), cpu_ticks()
  procs, setup = {}, {}
  try:
    for f in frameworks:
      procs[f] = Proc(f, log_dir, args.huge_pages)
      setup[f] = procs[f].call('setup', **w['params'])
    procs['rmjax'].call('setup_dots', shapes={'step': list(w['matmul']), 'square_2048': [SQUARE] * 3})
    dot_times = {'step': [], 'square_2048': []}
    ref = setup['rmjax']['check']
    tols = CHECK_TOL[w['params']['workload']]
    checks = {}
    for f in frameworks:
      got = setup[f]['check']
      diffs = [abs(a - b) for a, b in zip(ref, got)]
      ok = len(got) >= len(tols) and all(d <= tol for d, tol in zip(diffs, tols))
      checks[f] = {'values': got, 'max_abs_diff': max(diffs) if diffs else 0.0, 'ok': ok}
      if not ok:
        raise RuntimeError(f'{w["name"]}: {f} computes {got[:len(tols)]}, rmjax {ref[:len(tols)]} '
                           f'(tolerances {tols}); the frameworks do not run the same model.')
    steps = {f: steps_for(procs[f].call('time', steps=1)['times'][0], args.round_seconds) for f in frameworks}
    rounds = {f: [] for f in frameworks}
    idle_wait = {f: 0.0 for f in frameworks}
    for r in range(args.repeats):
      order = frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]
      for f in order:
        idle_wait[f] += wait_idle([procs[o].p.pid for o in frameworks if o != f])
        res = procs[f].call('time', steps=steps[f])
        rounds[f].append(res['times'])
        setup[f]['peak_rss_mb'], setup[f]['device_peak_mb'] = res['peak_rss_mb'], res['device_peak_mb']
        if f == 'rmjax':  # the machine's matmul rate, under the same load as this round
          for name, t in procs[f].call('time_dots')['times'].items():
            dot_times[name] += t
  finally:
    for p in procs.values():
      p.close()
  out = {'name': w['name'], 'kind': w['params']['workload'], 'size': w['params'].get('size'),
         'params': w['params'], 'flops_per_step': w.get('flops'), 'tokens_per_step': w.get('tokens'),
         'largest_matmul': list(w['matmul']), 'load_before': load0,
         'dots': {name: dict(stats(t), gflops_per_s=2 * np.prod(shape) / np.median(t) / 1e9, shape=list(shape))
                  for (name, t), shape in zip(dot_times.items(), (w['matmul'], (SQUARE,) * 3))},
         'load_after': loadavg(), 'steal': steal_fraction(ticks0), 'frameworks': {}}
  for f in frameworks:
    all_times = [t for rnd in rounds[f] for t in rnd]
    rec = dict(stats(all_times), framework=setup[f].get('framework', f), compile_s=setup[f].get('compile_s'),
               first_steps_s=setup[f].get('first_steps_s'), peak_rss_mb=setup[f]['peak_rss_mb'],
               device_peak_mb=setup[f]['device_peak_mb'], cpus=setup[f]['cpus'],
               check=checks[f], steps_per_round=steps[f], round_medians_s=[float(np.median(r)) for r in rounds[f]],
               idle_wait_s=idle_wait[f], microbatches=setup[f].get('microbatches'))
    device = rec['device'] = setup[f]['device']
    if w.get('tokens'):
      rec['tokens_per_s'] = w['tokens'] / rec['median_s']
    if w.get('flops'):
      rec['gflops_per_s'] = w['flops'] / rec['median_s'] / 1e9
      rec['dot_fraction'] = rec['gflops_per_s'] / out['dots']['step']['gflops_per_s']
      rec['square_dot_fraction'] = rec['gflops_per_s'] / out['dots']['square_2048']['gflops_per_s']
      peak = common.peak_tflops(device['kind'], device.get('matmul_precision'))
      if peak:  # model FLOPs utilization against the device's nominal peak
        rec['mfu'] = {'fraction': rec['gflops_per_s'] / 1e3 / peak[0], 'peak_tflops': peak[0], 'mode': peak[1]}
    rmjax_platform = setup['rmjax']['device']['platform']
    if f != 'rmjax' and device['platform'] != rmjax_platform:
      rec['not_compared'] = f'{f} ran on {device["platform"]}, rmjax on {rmjax_platform}'
    elif f != 'rmjax':
      per_round = [np.median(p) / np.median(q) for p, q in zip(rounds[f], rounds['rmjax'])]
      rec['speedup_vs_rmjax'] = {'median': float(np.median(per_round)), 'min': float(np.min(per_round)),
                                 'max': float(np.max(per_round)),
                                 'of_medians': rec['median_s'] / stats([t for r in rounds['rmjax'] for t in r])['median_s']}
    out['frameworks'][f] = rec
  print_workload(out)
  return out


def print_workload(r: dict) -> None:
  for f, rec in r['frameworks'].items():
    extra = f'  not compared: {rec["not_compared"]}' if 'not_compared' in rec else ''
    if 'speedup_vs_rmjax' in rec:
      s = rec['speedup_vs_rmjax']
      extra = f'  rmjax speed-up {s["median"]:.2f}x [{s["min"]:.2f}-{s["max"]:.2f}]'
    comp = rec['compile_s']
    comp = f'{comp:.1f}s' if comp is not None else '-'
    tok = f'{rec["tokens_per_s"]:9.0f} tok/s' if 'tokens_per_s' in rec else ''
    fl = f'{rec["gflops_per_s"]:6.1f} GFLOP/s' if 'gflops_per_s' in rec else ''
    frac = f' ({rec["dot_fraction"]:.0%} of dot)' if 'dot_fraction' in rec else ''
    if 'mfu' in rec:
      frac += ' ' + report_lib.mfu_text(rec['mfu'])
    dev_mem = f' (device {rec["device_peak_mb"]:.0f} MB)' if rec.get('device_peak_mb') else ''
    if rec.get('idle_wait_s', 0) > 1:
      extra += f'  (waited {rec["idle_wait_s"]:.0f}s for the other workers to go idle)'
    print(f'  {f:6s} {rec["median_s"] * 1e3:9.2f} ms [{rec["p25_s"] * 1e3:.2f}-{rec["p75_s"] * 1e3:.2f}, min '
          f'{rec["min_s"] * 1e3:.2f}]  {tok} {fl}{frac}  compile {comp}  rss {rec["peak_rss_mb"]:.0f} MB{dev_mem}{extra}',
          flush=True)


def workloads(args) -> list[dict]:
  ws = []
  for size in args.sizes:
    s = common.shape(size)
    rm_tokens = 2 * RM['pairs'] * RM['seq_len']
    mm = common.largest_matmul(s, rm_tokens)
    if 'rm' in args.only:
      # rmjax's RM step as the RM job runs it, `train.grad_accum_steps='auto'` (on one CPU device the
      # same update in microbatches of 1024 tokens inside the compiled step, `accumulate.auto_steps`),
      # and, in the last row, unsplit; the peer's step is the same in every row.
      for members, kind, accum, label in ((1, 'full', 'auto', 'RM step'), (4, 'full', 'auto', 'RM K=4 full ensemble'),
                                          (4, 'multi_head', 'auto', 'RM K=4 multi-head'),
                                          (1, 'full', 1, 'RM step, rmjax unsplit')):
        heads = members if kind == 'multi_head' else 1
        flops = common.rm_step_flops(s, RM['pairs'], RM['seq_len'], heads) * (members if kind == 'full' else 1)
        ws.append({'name': f'{label} [{size}]', 'flops': flops, 'tokens': rm_tokens * (members if kind == 'full' else 1),
                   'matmul': mm, 'peers': ['torch'],
                   'params': dict(workload='rm', size=size, members=members, kind=kind, grad_accum_steps=accum, **RM)})
    if 'generate' in args.only:
      for top_p, label in ((1.0, 'generation, temperature 1'), (0.9, 'generation, top-p 0.9')):
        ws.append({'name': f'{label} [{size}]', 'tokens': GEN['rows'] * GEN['new_tokens'],
                   'flops': common.generate_flops(s, GEN['rows'], GEN['prompt_len'], GEN['new_tokens']),
                   'matmul': (GEN['rows'], s.width, s.vocab), 'peers': ['torch', 'tunix'],
                   'params': dict(workload='generate', size=size, top_p=top_p, **GEN)})
    if 'grpo' in args.only:
      rows = GRPO['prompts_per_step'] * GRPO['group']
      ws.append({'name': f'GRPO iteration [{size}]', 'tokens': rows * GRPO['new_tokens'],
                 'flops': common.grpo_flops(s, rows, GRPO['prompt_len'], GRPO['new_tokens']),
                 'matmul': common.largest_matmul(s, rows * (GRPO['prompt_len'] + GRPO['new_tokens']), lm_head=True),
                 'peers': ['torch', 'tunix'],
                 'params': dict(workload='grpo', size=size, **GRPO)})
  return ws


def save(report: dict, path: Path) -> None:
  """Writes `report` to `path` and to `latest.json` beside it, each through a temporary file and a rename: a run
  stopped part-way leaves the workloads it finished (`finished` false)."""
  text = json.dumps(report, indent=1)
  for target in (path, path.with_name('latest.json')):
    tmp = target.with_name(target.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, target)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--only', default='rm,generate,grpo,scaling',
                  help='comma-separated workloads: rm, generate, grpo, scaling')
  ap.add_argument('--sizes', default='tiny,small', help='comma-separated shapes: tiny, small, base')
  ap.add_argument('--peers', default='torch,tunix', help='comma-separated peers to run (torch, tunix; "" for none)')
  ap.add_argument('--repeats', type=int, default=5, help='interleaved rounds per workload')
  ap.add_argument('--round-seconds', type=float, default=2.0, help='target seconds of one framework per round')
  ap.add_argument('--scaling-size', default='tiny', help='shape of the scaling sweep')
  ap.add_argument('--no-huge-pages', dest='huge_pages', action='store_false',
                  help=f'run the workers without GLIBC_TUNABLES={local.HUGE_PAGES} '
                       '(glibc malloc on transparent huge pages)')
  ap.add_argument('--out', default=str(RESULTS), help='folder for the JSON results (and the scaling PNG)')
  args = ap.parse_args(argv)
  args.only = [x for x in args.only.split(',') if x]
  args.sizes = [x for x in args.sizes.split(',') if x]
  peers = [x for x in args.peers.split(',') if x]
  unknown = set(args.only) - {'rm', 'generate', 'grpo', 'scaling'}
  if unknown:
    raise SystemExit(f'--only: unknown workloads {sorted(unknown)}; choose from rm, generate, grpo, scaling.')
  for size in args.sizes + [args.scaling_size]:
    common.shape(size)
  out_dir = Path(args.out)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  log_dir = out_dir / f'logs-{stamp}'
  log_dir.mkdir(parents=True, exist_ok=True)
  report = {'started': stamp, 'machine': machine(), 'huge_pages': args.huge_pages, 'load_start': loadavg(),
            'optimizer': common.OPTIM, 'settings': {'rm': RM, 'generate': GEN, 'grpo': GRPO},
            'workloads': [], 'errors': [], 'finished': False}
  print(f'machine: {report["machine"]}  load {report["load_start"]:.2f}', flush=True)
  for p in list(peers):  # a peer that cannot be installed here leaves rmjax's rows standing
    try:
      envs.python(p)
    except Exception as e:
      error = (f'{type(e).__name__}: {e}; its rows are left out (--peers chooses the peers, --peers "" runs rmjax '
               'alone)')
      print(f'peer {p} unavailable: {error}', flush=True)
      report['errors'].append({'workload': f'peer {p}', 'error': error})
      peers.remove(p)
  path = out_dir / f'{stamp}.json'
  for w in workloads(args):
    frameworks = ['rmjax'] + [p for p in w['peers'] if p in peers]
    try:
      report['workloads'].append(run_workload(w, frameworks, args, log_dir))
    except Exception as e:  # one failing workload does not stop the others
      print(f'  FAILED: {e}', flush=True)
      report['errors'].append({'workload': w['name'], 'error': str(e)})
    save(report, path)
  if 'scaling' in args.only:
    from benchmarks import scaling
    report['scaling'] = scaling.sweep(args, log_dir, out_dir / f'scaling-{stamp}.png')
  report['load_end'] = loadavg()
  report['finished'] = True
  save(report, path)
  print(f'\nresults: {path}', flush=True)
  print(report_lib.markdown(report), flush=True)
  return 1 if report['errors'] else 0


if __name__ == '__main__':
  sys.exit(main())
