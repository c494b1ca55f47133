"""Config loading and validation: clear errors before anything compiles."""
import subprocess
import sys

import pytest

from rmjax import config as C

RM_CONFIG = 'configs/rm.py'


def test_rm_config_variants_load():
  for arg in ('tiny', 'test', 'small'):
    c = C.load_config_file(f'{RM_CONFIG}:{arg}')
    assert c.ensemble.members >= 2 and c.job == 'experiments.rm_world:run'
  assert C.load_config_file(RM_CONFIG).ensemble.members == 4  # the default is the K=4 job
  with pytest.raises(ValueError, match='unknown variant'):
    C.load_config_file(f'{RM_CONFIG}:huge')


def test_unknown_override_lists_valid_keys():
  c = C.load_config_file(RM_CONFIG)
  C.check_override_keys(c, ['--config.optim.lr=1e-4', '--workdir=x'])
  with pytest.raises(C.ConfigError, match=r"optim has no field 'lrr'.*valid keys at optim: .*lr"):
    C.check_override_keys(c, ['--config.optim.lrr=1e-4'])
  with pytest.raises(C.ConfigError, match='valid keys at the top level: .*optim'):
    C.check_override_keys(c, ['--config.optimizer.lr=1'])


def test_require_helpers():
  c = C.load_config_file(RM_CONFIG)
  c.ensemble.kind = 'bagged'
  with pytest.raises(C.ConfigError, match=r"config.ensemble.kind='bagged': expected one of \('full', 'multi_head'\)"):
    C.require_choice(c, 'ensemble.kind', ('full', 'multi_head'))
  c.data.flip_prob = 0.9
  with pytest.raises(C.ConfigError, match=r'data.flip_prob=0.9: expected a number in \[0.0, 0.5\]'):
    C.require_range(c, 'data.flip_prob', 0.0, 0.5)


def test_model_config_from_section():
  m = C.model_config(C.model('tiny'), vocab_size=259)
  assert (m.vocab_size, m.width, m.num_layers) == (259, 64, 2)
  m = C.model_config(C.model('tiny', vocab_size=512, width=32, num_heads=2, num_kv_heads=1))
  assert (m.vocab_size, m.width, m.num_heads) == (512, 32, 2)


def test_cli_unknown_key_exits_with_message(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'rmjax.main', f'--config={RM_CONFIG}:test', f'--workdir={tmp_path}',
                        '--config.train.stepz=3'], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "train has no field 'stepz'" in out.stderr and 'steps' in out.stderr
  assert 'Traceback' not in out.stderr


def test_cli_bad_value_is_caught_before_compiling(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'rmjax.main', f'--config={RM_CONFIG}:test', f'--workdir={tmp_path}',
                        '--config.ensemble.kind=bagged'], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "config.ensemble.kind='bagged'" in out.stderr
  assert not (tmp_path / 'policy').exists()  # nothing ran
