"""The RM step on 8 forced CPU devices matches one device, with parameters sharded over fsdp."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name('multidevice_checks.py')


@pytest.fixture(scope='module')
def results():
  out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', ['2x4', '1x8', '8x1'])
def test_rm_step_matches_single_device(results, mesh):
  # Two steps of AdamW: the sharded reductions reorder float sums, so agreement is to 1e-5.
  np.testing.assert_allclose(results[mesh]['losses'], results['single']['losses'], rtol=1e-5, atol=1e-6)
  assert results[mesh]['devices'] == 8


@pytest.mark.parametrize('mesh,fsdp', [('2x4', 4), ('1x8', 8), ('8x1', 1)])
def test_each_device_holds_about_one_over_fsdp_of_the_params(results, mesh, fsdp):
  share = results[mesh]['max_share']
  # Matrices and embeddings split over fsdp; norm scales and biases (< 2% of the bytes at
  # `tiny`) stay replicated.
  assert 1 / fsdp <= share <= 1 / fsdp + 0.02
