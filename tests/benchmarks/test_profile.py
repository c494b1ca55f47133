"""`benchmarks.profile`: instructions of a compiled program classed and named, profiler events attributed to them
per step, and the command itself on the `tiny` generation."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile

# A compiled module's text, cut down to the lines `ops_from_hlo` reads: a dot fusion, a reduction, data
# movement, an elementwise loop and a while loop, under jax's call-path wrappers.
HLO = '''HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  %dot.1 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tanh.1 = f32[8,2]{1,0} tanh(%dot.1)
}

%fused_sum (p0.1: f32[8,2]) -> f32[8] {
  %p0.1 = f32[8,2]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%p0.1, %c), dimensions={1}, to_apply=%add
}

%fused_move (p0.2: f32[8,2]) -> f32[2,8] {
  %p0.2 = f32[8,2]{1,0} parameter(0)
  ROOT %transpose.1 = f32[2,8]{0,1} transpose(%p0.2), dimensions={1,0}
}

%fused_scale (p0.3: f32[8,2]) -> f32[8,2] {
  %p0.3 = f32[8,2]{1,0} parameter(0)
  ROOT %multiply.1 = f32[8,2]{1,0} multiply(%p0.3, %p0.3)
}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8] {
  %ynn_fusion.3 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/while/body/closed_call/transpose(jvp(ScalarRewardModel))/backbone/layers_5/mlp/gate_up/dot_general"}
  %reduce_fusion = f32[8]{0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_sum, metadata={op_name="jit(step)/jvp(ScalarRewardModel)/backbone/layers_0/attn_norm/reduce_sum"}
  %transpose_fusion = f32[2,8]{0,1} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_move, metadata={op_name="jit(step)/transpose(jvp())/transpose"}
  %loop_fusion = f32[8,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_scale, metadata={op_name="jit(step)/transpose(jvp(ScalarRewardModel))/backbone/layers_1/mlp/jit(silu)/mul"}
  %while.2 = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %dot.9 = f32[8]{0} dot(%a, %b), metadata={op_name="jit(step)/optimizer/dot_general"}
}
'''


def test_instructions_are_classed_and_named():
  ops = profile.ops_from_hlo(HLO)
  assert ops['ynn_fusion.3'] == profile.Op('dot', 'backbone/layers_*/mlp/gate_up/dot_general', 'bwd', 'f32[8,2]')
  assert ops['reduce_fusion'] == profile.Op('reduce', 'backbone/layers_*/attn_norm/reduce_sum', 'fwd', 'f32[8]')
  assert ops['transpose_fusion'] == profile.Op('copy', 'transpose', 'bwd', 'f32[2,8]')
  assert ops['loop_fusion'] == profile.Op('elementwise', 'backbone/layers_*/mlp/mul', 'bwd', 'f32[8,2]')
  assert ops['while.2'].kind == 'control'
  assert ops['dot.9'] == profile.Op('dot', 'optimizer/dot_general', '', 'f32[8]')


def test_events_are_summed_per_operation_and_step():
  ops = profile.ops_from_hlo(HLO)
  ev = lambda op, dur, module='jit_step': {'ph': 'X', 'dur': dur, 'name': op, 'args': {'hlo_op': op, 'hlo_module': module}}
  events = [ev('ynn_fusion.3', 1000.0), ev('ynn_fusion.3', 3000.0), ev('loop_fusion', 500.0),
            ev('while.2', 9000.0),  # encloses its body's events: not counted again
            ev('ynn_fusion.3', 7000.0, module='jit_other'), {'ph': 'X', 'dur': 50.0, 'name': 'ThunkExecutor::Execute'}]
  times = profile.attribute(events, 'jit_step', ops, steps=2)
  assert times == {ops['ynn_fusion.3']: (2.0, 1.0), ops['loop_fusion']: (0.25, 0.5)}  # µs -> ms, per step
  text = profile.tables(times, top=1)
  assert '| dot | 2.00 | 89% |' in text and '| all operations | 2.25 | |' in text
  assert text.count('backbone/layers_*') == 1  # top = 1


def test_a_compiled_gradient_profiled(tmp_path):
  """The gradient of Σ tanh(x w): its forward and backward dots are found in the trace, once per call each."""
  grad = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum()))
  w, x = jnp.full((256, 256), 0.01), jnp.ones((512, 256))
  compiled = grad.lower(w, x).compile()
  compiled(w, x).block_until_ready()
  times = profile.profile(lambda: compiled(w, x).block_until_ready(), compiled.as_text(), 3, tmp_path)
  dots = {(op.direction, op.shape): calls for op, (_, calls) in times.items() if op.kind == 'dot'}
  assert dots == {('fwd', 'f32[512,256]'): 1, ('bwd', 'f32[256,256]'): 1}
  dot_ms = sum(ms for op, (ms, _) in times.items() if op.kind == 'dot')
  assert dot_ms > 0.5 * sum(ms for ms, _ in times.values())  # 2 × 67 MFLOP of dots against 131k tanh


def test_bad_arguments_are_refused_before_anything_is_built():
  with pytest.raises(SystemExit, match='--steps'):
    profile.main(['rm', '--steps', '0'])
  with pytest.raises(ValueError, match="unknown shape 'huge'"):
    profile.main(['rm', '--size', 'huge'])


def test_the_command_on_tiny_generation(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'benchmarks.profile', 'generate', '--size', 'tiny', '--steps', '1',
                        '--top', '3', '--trace-dir', str(tmp_path)], cwd=Path(__file__).parents[2],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| dot |' in out.stdout and 'attn' in out.stdout
  lines = out.stdout.strip().splitlines()
  top_rows = lines[lines.index('| ms / step | share | calls / step | kind | pass | op | shape |') + 2:]
  assert len(top_rows) == 3 and all(row.startswith('| ') for row in top_rows)
  assert list(tmp_path.glob('**/*.trace.json.gz'))
