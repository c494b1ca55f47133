"""On 8 forced CPU devices: the RM step, sampling, a PPO iteration (alone and as a population) and
DPO steps (alone and as a population, in microbatches) match one device under data x fsdp x
tensor meshes, parameters are sharded over fsdp (and tensor), and a checkpoint moves between
meshes."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name('multidevice_checks.py')
MESHES = ['2x4x1', '1x4x2']


@pytest.fixture(scope='module')
def results():
  out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', MESHES)
def test_rm_step_matches_single_device(results, mesh):
  # Three steps of AdamW: the sharded reductions reorder float sums, so agreement is to 1e-5.
  rm = results['rm']
  np.testing.assert_allclose(rm[mesh]['losses'], rm['single']['losses'], rtol=1e-5, atol=1e-6)
  assert rm[mesh]['devices'] == 8


@pytest.mark.parametrize('mesh', MESHES)
def test_a_checkpoint_saved_on_2x4_restores_on_every_mesh(results, mesh):
  # Bitwise the saved arrays, placed with the target mesh's shardings; step 3 from it matched above.
  assert results['rm'][mesh]['restored_equal'] and results['rm'][mesh]['restored_placed']


@pytest.mark.parametrize('mesh,split', [('2x4x1', 4), ('1x4x2', 8)])
def test_each_device_holds_about_one_over_fsdp_times_tensor_of_the_params(results, mesh, split):
  share = results['rm'][mesh]['max_share']
  # Matrices and embeddings split over fsdp (and tensor); norm scales and biases (< 2% of the
  # bytes at `tiny`) stay replicated.
  assert 1 / split <= share <= 1 / split + 0.02
  assert results['rm']['single']['max_share'] == 1.0


@pytest.mark.parametrize('mesh,split', [('2x4x1', 4), ('1x4x2', 8)])
def test_scanned_remat_accumulated_rm_step_matches_plain_single_device(results, mesh, split):
  # scan_layers + remat='block' + 2 accumulation steps, from the same (stacked) initial parameters:
  # the same losses as the plain one-device run to 1e-5 (float sums reordered), and the stacked
  # parameters still split over fsdp (and tensor), the layer axis whole.
  run = results['rm_scaled'][mesh]
  np.testing.assert_allclose(run['losses'], results['rm']['single']['losses'], rtol=1e-5, atol=1e-6)
  assert 1 / split <= run['max_share'] <= 1 / split + 0.02


@pytest.mark.parametrize('mesh', ['2x4x1', '1x4x2'])
def test_greedy_samples_match_single_device(results, mesh):
  assert results['samples'][mesh] == results['samples']['single']


def test_small_model_parameter_bytes_per_device(results):
  b = results['small_param_bytes']
  assert b['8x1x1'] == b['total']  # pure data parallel: every device holds everything
  for mesh, split in (('1x8x1', 8), ('2x4x1', 4), ('1x4x2', 8), ('1x1x8', 8)):
    assert b['total'] / split <= b[mesh] <= b['total'] / split * 1.02, (mesh, b)


@pytest.mark.parametrize('mesh,split', [('2x4x1', 4), ('1x4x2', 8)])
def test_rl_iteration_matches_single_device(results, mesh, split):
  rl = results['rl']
  # Same key, same sampler: the same tokens (a flip would need logits tied within 1e-6).
  assert rl[mesh]['tokens'] == rl['1x1x1']['tokens']
  # Sharded reductions reorder float sums: metrics and updated params agree to 1e-5 relative.
  for k, v in rl['1x1x1']['metrics'].items():
    np.testing.assert_allclose(rl[mesh]['metrics'][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(rl[mesh]['params'], rl['1x1x1']['params']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert 1 / split <= rl[mesh]['policy_share'] <= 1 / split + 0.02


@pytest.mark.parametrize('mesh,split', [('2x4x1', 4), ('1x4x2', 8)])
def test_rl_population_iteration_matches_single_device(results, mesh, split):
  # Two members (own seeds and references, KL coefficients 0.02 and 0.1), one vmapped iteration:
  # the same tolerances as a single run, and each member's policy split over fsdp (and tensor)
  # with the population axis whole.
  rl = results['rl_population']
  assert rl[mesh]['tokens'] == rl['1x1x1']['tokens']
  assert abs(rl['1x1x1']['metrics']['loss'][0] - rl['1x1x1']['metrics']['loss'][1]) > 1e-3  # the members differ
  for k, v in rl['1x1x1']['metrics'].items():
    np.testing.assert_allclose(rl[mesh]['metrics'][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(rl[mesh]['params'], rl['1x1x1']['params']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert 1 / split <= rl[mesh]['policy_share'] <= 1 / split + 0.02
  assert rl['1x1x1']['policy_share'] == 1.0


@pytest.mark.parametrize('mesh,split', [('2x4x1', 4), ('1x4x2', 8)])
@pytest.mark.parametrize('run', ['single', 'population'])
def test_dpo_steps_in_microbatches_match_plain_single_device(results, mesh, split, run):
  # Two SGD steps; on the meshes each step runs as 2 microbatches. The loss divides by the whole
  # batch's weight, so metrics and parameters agree to 1e-5 (float sums reordered).
  d = results['dpo']
  for got, want in zip(d[mesh][run], d['1x1x1'][run]):
    for k, v in want.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(d[mesh][f'{run}_params'], d['1x1x1'][f'{run}_params']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert d['1x1x1'][run][1]['loss'] < d['1x1x1'][run][0]['loss']  # it learns
  assert 1 / split <= d[mesh][f'{run}_share'] <= 1 / split + 0.02
