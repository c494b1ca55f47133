"""The harness's bookkeeping (`benchmarks.run`, `benchmarks.report`) on canned worker replies: model
FLOPs utilization against a GPU's nominal peak, speed-ups only between frameworks on the same kind
of device, a peer that cannot be installed leaving rmjax's rows standing, and runs side by side; and,
in worker processes of their own, XLA's thread count and the float32 check values."""
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from benchmarks import common, report, run

H100 = {'platform': 'gpu', 'kind': 'NVIDIA H100 80GB HBM3', 'matmul_precision': None}
CPU = {'platform': 'cpu', 'kind': 'cpu'}


@pytest.mark.parametrize('kind, precision, expected', [
    ('NVIDIA H100 80GB HBM3', None, (495.0, 'tf32')),
    ('NVIDIA H100 80GB HBM3', 'highest', (67.0, 'float32')),
    ('NVIDIA H100 PCIe', None, (378.0, 'tf32')),
    ('NVIDIA H200', 'float32', (67.0, 'float32')),
    ('NVIDIA H200 NVL', None, (418.0, 'tf32')),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', (312.0, 'bfloat16')),
    ('cpu', None, None),
])
def test_peak_tflops_picks_the_device_and_the_mode_of_fp32_dots(kind, precision, expected):
  assert common.peak_tflops(kind, precision) == expected


def test_a_jax_worker_on_this_cpu_reports_no_accelerator():
  import jax  # noqa: F401  (device_peak_mb reads the jax a worker has imported)
  assert common.jax_device() == {'platform': 'cpu', 'kind': 'cpu', 'matmul_precision': None}
  assert common.device_peak_mb() is None
  assert common.peak_tflops(common.jax_device()['kind'], None) is None


def fake_proc(devices, step_s):
  """A `run.Proc` stand-in whose workers all compute the same check values, on `devices[framework]`,
  taking `step_s[framework]` seconds a step."""

  class Proc:
    def __init__(self, framework, log_dir, huge_pages):
      self.framework, self.p = framework, types.SimpleNamespace(pid=0)

    def call(self, cmd, **kw):
      f = self.framework
      if cmd == 'setup':
        return {'check': [0.69, 0.68], 'framework': f, 'device': devices[f], 'compile_s': 1.0, 'cpus': [0, 1]}
      if cmd == 'time':
        return {'times': [step_s[f]] * kw['steps'], 'peak_rss_mb': 100.0,
                'device_peak_mb': 2048.0 if devices[f]['platform'] == 'gpu' else None}
      if cmd == 'time_dots':
        return {'times': {'step': [1e-3], 'square_2048': [1e-3]}}
      return {}

    def close(self):
      pass

  return Proc


def test_mfu_and_speed_ups_between_frameworks_on_the_same_device(monkeypatch, tmp_path):
  devices = {'rmjax': H100, 'tunix': H100, 'torch': CPU}
  monkeypatch.setattr(run, 'Proc', fake_proc(devices, {'rmjax': 0.01, 'tunix': 0.025, 'torch': 0.2}))
  monkeypatch.setattr(run, 'wait_idle', lambda pids: 0.0)
  w = {'name': 'RM step [base]', 'flops': 1e12, 'tokens': 4096, 'matmul': (4096, 768, 4096),
       'params': {'workload': 'rm', 'size': 'base'}}
  args = types.SimpleNamespace(huge_pages=False, round_seconds=0.1, repeats=3)
  out = run.run_workload(w, ['rmjax', 'tunix', 'torch'], args, tmp_path)
  rmjax, tunix, torch = (out['frameworks'][f] for f in ('rmjax', 'tunix', 'torch'))
  # 1e12 FLOPs in 10 ms = 100 TFLOP/s against the H100's 495 TFLOP/s of TF32 dots.
  assert rmjax['mfu'] == pytest.approx({'fraction': 100 / 495, 'peak_tflops': 495.0, 'mode': 'tf32'})
  assert tunix['mfu']['fraction'] == pytest.approx(40 / 495)
  assert tunix['speedup_vs_rmjax']['median'] == pytest.approx(2.5)
  assert rmjax['device_peak_mb'] == 2048.0
  # A peer on the CPU beside rmjax on the GPU gets no speed-up and no MFU.
  assert 'speedup_vs_rmjax' not in torch and 'mfu' not in torch
  assert torch['not_compared'] == 'torch ran on cpu, rmjax on gpu'
  table = report.markdown({'machine': run.machine(), 'load_start': 0.0, 'workloads': [out]})
  assert 'MFU 20.2% of 495 TFLOP/s (tf32)' in table and 'rmjax on NVIDIA H100 80GB HBM3' in table
  assert '100 (device 2048)' in table and 'torch ran on cpu, rmjax on gpu' in table


def test_on_the_cpu_there_is_no_mfu_and_peers_are_compared(monkeypatch, tmp_path):
  monkeypatch.setattr(run, 'Proc', fake_proc({'rmjax': CPU, 'torch': CPU}, {'rmjax': 0.04, 'torch': 0.06}))
  monkeypatch.setattr(run, 'wait_idle', lambda pids: 0.0)
  w = {'name': 'RM step [tiny]', 'flops': 3e9, 'tokens': 4096, 'matmul': (4096, 64, 344),
       'params': {'workload': 'rm', 'size': 'tiny'}}
  out = run.run_workload(w, ['rmjax', 'torch'], types.SimpleNamespace(huge_pages=False, round_seconds=0.1, repeats=2),
                         tmp_path)
  assert all('mfu' not in r for r in out['frameworks'].values())
  assert out['frameworks']['torch']['speedup_vs_rmjax']['median'] == pytest.approx(1.5)
  assert 'MFU' not in report.markdown({'machine': run.machine(), 'load_start': 0.0, 'workloads': [out]})


def test_an_uninstallable_peer_is_reported_and_left_out(monkeypatch, tmp_path):
  def python(name):
    raise ValueError(f'no CPU torch wheel for {name}')

  monkeypatch.setattr(run.envs, 'python', python)
  monkeypatch.setattr(run, 'workloads', lambda args: [])
  assert run.main(['--only', 'rm', '--peers', 'torch', '--out', str(tmp_path)]) == 1
  errors = json.loads((tmp_path / 'latest.json').read_text())['errors']
  assert errors == [{'workload': 'peer torch', 'error': 'ValueError: no CPU torch wheel for torch; its rows are left '
                     'out (--peers chooses the peers, --peers "" runs rmjax alone)'}]


def test_a_run_stopped_part_way_keeps_the_workloads_it_finished(monkeypatch, tmp_path):
  proc = fake_proc({'rmjax': CPU}, {'rmjax': 0.04})

  class StoppedOnSmall(proc):
    def call(self, cmd, **kw):
      if cmd == 'setup' and kw['size'] == 'small':
        raise KeyboardInterrupt  # the run is stopped during its second workload
      return super().call(cmd, **kw)

  monkeypatch.setattr(run, 'Proc', StoppedOnSmall)
  monkeypatch.setattr(run, 'wait_idle', lambda pids: 0.0)
  with pytest.raises(KeyboardInterrupt):
    run.main(['--only', 'rm', '--sizes', 'tiny,small', '--peers', '', '--repeats', '1', '--out', str(tmp_path)])
  saved = json.loads((tmp_path / 'latest.json').read_text())
  assert not saved['finished'] and saved['errors'] == []
  assert [w['name'] for w in saved['workloads']] == [
      'RM step [tiny]', 'RM K=4 full ensemble [tiny]', 'RM K=4 multi-head [tiny]', 'RM step, rmjax unsplit [tiny]']
  assert sorted(p.name for p in tmp_path.glob('*.json')) == sorted(['latest.json', f'{saved["started"]}.json'])
  report.markdown(saved)  # a partial run still prints


def test_runs_side_by_side():
  def run(rm_ms, speedup, exponent, with_generation):
    workloads = [{'name': 'RM step [tiny]', 'frameworks': {
        'rmjax': {'median_s': rm_ms / 1e3}, 'torch': {'median_s': 0.05, 'speedup_vs_rmjax': {'median': speedup}}}}]
    if with_generation:
      workloads.append({'name': 'generation [tiny]', 'frameworks': {'rmjax': {'median_s': 0.0131}}})
    return {'workloads': workloads, 'scaling': {'rows': [
        {'step': 'RM step', 'dimension': 'seq', 'time_exponent': exponent, 'flop_exponent': 1.42}]}}

  table = report.compare({'a': run(35.6, 1.3, 1.33, False), 'b': run(39.6, 1.456, 1.391, True)}).split('\n')
  assert table == ['| workload | | a | b |', '|---|---|---|---|',
                   '| RM step [tiny] | rmjax ms | 35.6 | 39.6 |',
                   '| | speed-up vs torch | 1.30× | 1.46× |',
                   '| generation [tiny] | rmjax ms | – | 13.1 |',
                   '| scaling: RM step, seq (FLOPs 1.42) | time exponent | 1.33 | 1.39 |',
                   '| targets | met | 1 of 2 | 1 of 2 |']


def test_targets_met_and_missed_in_one_run():
  def workload(name, rmjax_s, **peers):
    frameworks = {'rmjax': {'median_s': rmjax_s, 'dot_fraction': 0.69}}
    frameworks.update({p: {'speedup_vs_rmjax': {'median': x}} for p, x in peers.items()})
    return {'name': name, 'frameworks': frameworks}

  one_run = {'workloads': [workload('RM step [tiny]', 0.036, torch=1.5), workload('RM step [small]', 1.0, torch=1.16),
                           workload('RM K=4 full ensemble [small]', 4.1, torch=0.98),
                           workload('generation, temperature 1 [small]', 0.3, torch=2.48, tunix=1.65)],
             'scaling': {'rows': [
                 {'step': 'RM step', 'dimension': 'seq', 'time_exponent': 1.57, 'flop_exponent': 1.42},
                 {'step': 'RM step', 'dimension': 'batch', 'time_exponent': 1.09, 'flop_exponent': 1.0}]}}
  assert report.targets(one_run).split('\n') == [
      '| | target | this run | |', '|---|---|---|---|',
      '| RM step [tiny], speed-up vs TRL + transformers | ≥ 1.50× | 1.50× | met |',
      '| RM step [small], speed-up vs TRL + transformers | ≥ 1.00× | 1.16× | met |',
      '| RM K=4 full ensemble [small], speed-up vs TRL + transformers | ≥ 1.00× | 0.98× | **missed** |',
      '| generation, temperature 1 [small], speed-up vs TRL + transformers | ≥ 3.00× | 2.48× | **missed** |',
      '| generation, temperature 1 [small], speed-up vs Tunix | ahead (> 1×) | 1.65× | met |',
      "| RM step [small], rmjax's FLOP/s of the dot rate | ≥ 90% | 69% | **missed** |",
      "| RM K=4 full ensemble [small], rmjax's time over its RM step [small] | < 4× | 4.10× | **missed** |",
      "| scaling: RM step, seq, time exponent | ≤ 1.1 × FLOPs' 1.42 = 1.56 | 1.57 | **missed** |",
      '| scaling: RM step, batch, time exponent | ≤ 1.1 | 1.09 | met |']
  assert report.targets({'workloads': []}) == ''


def test_targets_at_their_limits_and_drawn_run_by_run(tmp_path):
  def run(ensemble_s, tunix, exponent):
    return {'workloads': [
        {'name': 'RM step [small]', 'frameworks': {'rmjax': {'median_s': 1.0}}},
        {'name': 'RM K=4 full ensemble [small]', 'frameworks': {'rmjax': {'median_s': ensemble_s}}},
        {'name': 'GRPO iteration [tiny]', 'frameworks': {'rmjax': {'median_s': 0.03}, 'tunix': {
            'speedup_vs_rmjax': {'median': tunix, 'min': tunix - 0.5, 'max': tunix + 0.5}}}}],
        'scaling': {'rows': [{'step': 'RM step', 'dimension': 'batch', 'time_exponent': exponent, 'flop_exponent': 1.0}]}}

  at_limits = report.target_rows(run(4.0, 1.0, 1.1))  # '< 4×' and 'ahead' are strict, '≤ 1.1' is not
  assert [(t.what, t.met) for t in at_limits] == [
      ('GRPO iteration [tiny], speed-up vs Tunix', False),
      ("RM K=4 full ensemble [small], rmjax's time over its RM step [small]", False),
      ('scaling: RM step, batch, time exponent', True)]
  assert at_limits[0].spread == (0.5, 1.5)
  png = tmp_path / 'runs.png'
  panels = report.plot_targets({'a': run(4.0, 1.0, 1.1), 'b': run(3.9, 2.0, 1.2)}, png)
  assert panels == [t.what for t in at_limits]
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_runs_in_the_docs_render_with_the_targets_they_met():
  runs = {p.stem: json.loads(p.read_text()) for p in sorted((Path(run.__file__).parent / 'runs').glob('run*.json'))}
  documented = dict(zip([f'run{i:02d}' for i in range(9, 19)], (15, 16, 15, 16, 15, 16, 18, 18, 18, 15)))  # of 22
  assert report.compare({name: runs[name] for name in documented}).split('\n')[-1] == (
      '| targets | met | ' + ' | '.join(f'{met} of 22' for met in documented.values()) + ' |')
  missed = [t.what for t in report.target_rows(runs['run17']) if not t.met]
  assert missed == ['RM K=4 full ensemble [tiny], speed-up vs TRL + transformers',
                    'generation, temperature 1 [small], speed-up vs TRL + transformers',
                    "RM step [small], rmjax's FLOP/s of the dot rate",
                    "RM K=4 full ensemble [small], rmjax's time over its RM step [small]"]
  assert '| RM step [tiny] | rmjax (jax 0.10.2) | 40.8 [38.0–44.9] |' in report.markdown(runs['run17'])


@pytest.mark.parametrize('huge_pages', [True, False])
def test_only_rmjaxs_worker_keeps_the_harness_python_path(monkeypatch, huge_pages):
  # rmjax's worker runs the harness's own Python, so it needs what PYTHONPATH adds to it (packages installed
  # with `pip --target`, say); a peer's Python is its own environment's.
  monkeypatch.setenv('PYTHONPATH', '/opt/site')
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  assert run.worker_env('rmjax', huge_pages)['PYTHONPATH'] == f'{run.REPO}{os.pathsep}/opt/site'
  assert run.worker_env('torch', huge_pages)['PYTHONPATH'] == str(run.REPO)
  assert ('glibc.malloc.hugetlb=1' in run.worker_env('tunix', huge_pages).get('GLIBC_TUNABLES', '')) == huge_pages


def run_python(code: str) -> str:
  """stdout of `code` run by this Python in a process of its own, from the repository's root."""
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=Path(__file__).parents[2],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_a_pinned_jax_worker_computes_on_two_threads():
  threads = json.loads(run_python("""
      import json, os
      from benchmarks import common
      common.pin_threads()
      import jax.numpy as jnp
      x = jnp.ones((512, 512))
      (x @ x).block_until_ready()
      names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]
      print(json.dumps(names.count('tf_XLAEigen')))
  """))
  assert threads == min(common.THREADS, len(os.sched_getaffinity(0)))


def test_check_values_are_computed_with_float32_dots_where_the_default_is_not():
  """Where jax's default fp32 dots are not float32 (TF32 on a GPU), the RM check runs a second program compiled
  at 'float32' precision; on this CPU both programs compute in float32, so the two ways agree."""
  checks, texts = json.loads(run_python("""
      import json
      import jax.numpy as jnp
      from benchmarks.workers import rmjax_worker
      texts = []
      checks = []
      for float32_by_default in (True, False):
        w = rmjax_worker.Worker()
        w.float32_by_default = float32_by_default
        checks.append(w.setup('rm', size='tiny', pairs=2, seq_len=16)['check'])
        compiled = jnp.dot  # stands for the timed program, returned as it is where the default is float32
        program = w._check_program(jnp.dot, compiled, jnp.ones((4, 8)), jnp.ones((8, 3)))
        texts.append('timed program' if program is compiled else program.as_text())
      print(json.dumps([checks, texts]))
  """))
  assert texts[0] == 'timed program' and 'operand_precision={highest,highest}' in texts[1]
  assert len(checks[1]) == 2 and checks[1] == pytest.approx(checks[0], abs=1e-6)
