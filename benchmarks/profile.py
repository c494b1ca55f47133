"""Where a benchmark step's time goes: `python -m benchmarks.profile rm --size small` (docs/benchmarks.md).

Builds one of rmjax's benchmark workloads in the harness's worker with the harness's settings
(`benchmarks.run.RM`, `GEN`, `GRPO`; the RM step in `'auto'` microbatches, as in its RM rows), times `--steps` calls, then runs as many under the jax profiler and attributes the time of every
operation that XLA recorded (on the CPU, one event per thunk, named after its instruction of the
compiled program) to that instruction. Each instruction is classed from the compiled HLO:

  dot          a dot, or a fusion containing one (XLA:CPU fuses attention's max / exp / sum around its dots)
  reduce       a fusion or op containing a reduction and no dot
  copy         data movement only: copy, transpose, slice, concatenate, pad, gather, scatter, ...
  elementwise  the rest

and named by its `op_name` (the jax call path, `layers_N` as `layers_*`, fwd / bwd from autodiff).
Prints ms per step by class and the top operations; the trace stays in `--trace-dir` for TensorBoard
or Perfetto. Operation times on two threads overlap, so their sum can exceed the step's wall time.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

CONTROL = {'while', 'conditional', 'call'}  # their events enclose their bodies' ops
MOVEMENT = {'parameter', 'constant', 'bitcast', 'copy', 'transpose', 'slice', 'dynamic-slice', 'dynamic-update-slice',
            'concatenate', 'pad', 'gather', 'scatter', 'broadcast', 'reshape', 'tuple', 'get-tuple-element', 'iota'}
_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_WRAPPER = re.compile(r'[\w.<>-]*\((?:[^()]|\([^()]*\))*\)/')  # jit(step)/, jvp(Model)/, transpose(jvp(Model))/


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str  # dot | reduce | copy | elementwise | control
  path: str  # the jax call path, e.g. 'backbone/layers_*/mlp/gate_up/dot_general'
  direction: str  # 'fwd', 'bwd' (autodiff's transpose) or ''
  shape: str  # the output shape, e.g. 'f32[256,1376]'


def _kind(opcode: str, body: list[str]) -> str:
  if opcode in CONTROL:
    return 'control'
  opcodes = {opcode} if opcode != 'fusion' else set(body)
  if opcodes & {'dot', 'convolution'}:
    return 'dot'
  if opcodes & {'reduce', 'reduce-window'}:
    return 'reduce'
  return 'copy' if opcodes <= MOVEMENT else 'elementwise'


def _name(op_name: str) -> tuple[str, str]:
  direction = 'bwd' if 'transpose(' in op_name else 'fwd' if 'jvp(' in op_name else ''
  path = _WRAPPER.sub('', op_name)
  path = re.sub(r'(^|/)(while/body|while/cond|closed_call|checkpoint|remat)(?=/)', '', path).strip('/')
  return re.sub(r'layers_\d+', 'layers_*', path), direction


def ops_from_hlo(hlo_text: str) -> dict[str, Op]:
  """`{instruction name: Op}` for every instruction of a compiled module's text (`compiled.as_text()`)."""
  bodies: dict[str, list[str]] = collections.defaultdict(list)  # computation -> opcodes in it
  instructions = []
  computation = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, opcode = m.groups()
      bodies[computation].append(opcode)
      calls = re.search(r'calls=%([\w.-]+)', line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      instructions.append((name, shape.split('{')[0], opcode, calls and calls.group(1), op_name and op_name.group(1)))
  ops = {}
  for name, shape, opcode, calls, op_name in instructions:
    path, direction = _name(op_name or name)
    ops[name] = Op(_kind(opcode, bodies.get(calls, [])), path, direction, shape)
  return ops


def trace_events(trace_dir: Path) -> list[dict]:
  """The complete ('X') events of the newest `*.trace.json.gz` under `trace_dir`."""
  files = sorted(Path(trace_dir).glob('**/*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}: did the profiler run?')
  events = json.loads(gzip.decompress(files[-1].read_bytes()))
  events = events['traceEvents'] if isinstance(events, dict) else events
  return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def attribute(events: list[dict], module: str, ops: dict[str, Op], steps: int) -> dict[Op, tuple[float, float]]:
  """`{Op: (ms per step, calls per step)}` over the events of HLO module `module` (control flow left out)."""
  out: dict[Op, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for e in events:
    args = e.get('args', {})
    op = ops.get(args.get('hlo_op'))
    if args.get('hlo_module') != module or op is None or op.kind == 'control':
      continue
    out[op][0] += e['dur'] / 1e3 / steps  # trace times are µs
    out[op][1] += 1 / steps
  return {op: (ms, calls) for op, (ms, calls) in out.items()}


def profile(run_once: Callable[[], None], hlo_text: str, steps: int, trace_dir: Path) -> dict[Op, tuple[float, float]]:
  """Runs `run_once` `steps` times under the jax profiler and attributes the time to `hlo_text`'s instructions."""
  import jax
  module = re.match(r'HloModule (\S+?),', hlo_text).group(1)
  with jax.profiler.trace(str(trace_dir)):
    for _ in range(steps):
      run_once()
  return attribute(trace_events(trace_dir), module, ops_from_hlo(hlo_text), steps)


def tables(times: dict[Op, tuple[float, float]], top: int) -> str:
  """Markdown: ms per step by kind, then the `top` operations."""
  total = sum(ms for ms, _ in times.values()) or 1.0
  by_kind = collections.Counter()
  for op, (ms, _) in times.items():
    by_kind[op.kind] += ms
  lines = ['| kind | ms / step | share |', '|---|---|---|']
  lines += [f'| {k} | {ms:.2f} | {ms / total:.0%} |' for k, ms in by_kind.most_common()]
  lines += [f'| all operations | {total:.2f} | |', '',
            '| ms / step | share | calls / step | kind | pass | op | shape |', '|---|---|---|---|---|---|---|']
  for op, (ms, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f'| {ms:.2f} | {ms / total:.1%} | {calls:g} | {op.kind} | {op.direction} | {op.path} | {op.shape} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('workload', choices=['rm', 'generate', 'grpo'])
  ap.add_argument('--size', default='small', help='tiny, small or base')
  ap.add_argument('--members', type=int, default=1, help='rm: ensemble members K')
  ap.add_argument('--kind', default='full', choices=['full', 'multi_head'], help='rm: ensemble kind')
  ap.add_argument('--top-p', type=float, default=1.0, help='generate: nucleus mass (1 = plain sampling)')
  ap.add_argument('--steps', type=int, default=5, help='calls timed, then as many profiled')
  ap.add_argument('--top', type=int, default=25, help='operations listed')
  ap.add_argument('--trace-dir', default=None, help='where the trace is kept (default: a new temporary folder)')
  args = ap.parse_args(argv)
  if args.steps < 1:
    raise SystemExit('--steps must be at least 1.')

  from benchmarks import common, run
  common.shape(args.size)
  import numpy as np

  from benchmarks.workers import rmjax_worker  # pins this process to common.THREADS CPUs, as in the harness

  params = {'rm': dict(run.RM, members=args.members, kind=args.kind, grad_accum_steps='auto'),
            'generate': dict(run.GEN, top_p=args.top_p), 'grpo': run.GRPO}[args.workload]
  worker = rmjax_worker.Worker()
  setup = worker.setup(args.workload, size=args.size, **params)
  wall = np.median(common.timed(worker.run_once, args.steps)) * 1e3
  trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix='rmjax-profile-'))
  times = profile(worker.run_once, worker.program.as_text(), args.steps, trace_dir)
  print(f'{args.workload} [{args.size}] {params}: {wall:.1f} ms a step unprofiled (median of {args.steps}), '
        f'compiled in {setup["compile_s"]:.1f} s, {sum(c for _, c in times.values()):.0f} operations a step; '
        f'trace in {trace_dir}\n')
  print(tables(times, args.top))
  return 0


if __name__ == '__main__':
  sys.exit(main())
