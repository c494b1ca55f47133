"""Sweep helpers: product / zip, point names, overrides checked against the config."""
import pathlib

import ml_collections
import pytest

from launch import point, sweep
from rmjax import config as config_lib

ROOT = pathlib.Path(__file__).parent.parent.parent


def test_product_varies_the_last_factor_fastest():
  got = sweep.product(sweep.axis('a', (1, 2)), sweep.axis('b.c', ('x', 'y', 'z')))
  assert got == [{'a': 1, 'b.c': 'x'}, {'a': 1, 'b.c': 'y'}, {'a': 1, 'b.c': 'z'},
                 {'a': 2, 'b.c': 'x'}, {'a': 2, 'b.c': 'y'}, {'a': 2, 'b.c': 'z'}]


def test_zip_pairs_points_and_nests_in_product():
  z = sweep.zip(sweep.axis('seed', (0, 1)), sweep.axis('data.seed', (10, 11)))
  assert z == [{'seed': 0, 'data.seed': 10}, {'seed': 1, 'data.seed': 11}]
  assert len(sweep.product(sweep.axis('lr', (1e-3, 3e-3, 1e-2)), z)) == 6


@pytest.mark.parametrize('make,match', [
    (lambda: sweep.zip(sweep.axis('a', (1, 2)), sweep.axis('b', (1,))), 'equal lengths'),
    (lambda: sweep.product(sweep.axis('a', (1,)), sweep.axis('a', (2,))), 'more than one factor'),
    (lambda: sweep.axis('a', ()), 'non-empty'),
    (lambda: sweep.axis('a', 'abc'), 'non-empty list'),
])
def test_helpers_reject_misuse(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_point_names_are_sorted_readable_and_bounded():
  assert sweep.point_name({'seed': 1, 'optim.lr': 0.001}) == 'optim.lr=0.001,seed=1'
  assert sweep.point_name({}) == 'default'
  assert sweep.point_name({'p': 'a/b c', 't': (1, 2)}) == 'p=a_b_c,t=(1,2)'
  long_a, long_b = sweep.point_name({'k': 'x' * 200}), sweep.point_name({'k': 'x' * 199 + 'y'})
  assert len(long_a) == 120 and long_a != long_b
  with pytest.raises(config_lib.ConfigError, match='points 0 and 1'):
    sweep.unique_names([{'a': 'x/y'}, {'a': 'x y'}])


def _config():
  return ml_collections.ConfigDict(dict(optim=dict(lr=1e-3, name='adamw'), steps=10, sizes=(1, 2)))


def test_apply_overrides_sets_values_and_leaves_the_original():
  c = _config()
  got = sweep.apply_overrides(c, {'optim.lr': 3e-3, 'steps': 4, 'sizes': [3, 4]})
  assert (got.optim.lr, got.steps, got.sizes) == (3e-3, 4, (3, 4))
  assert (c.optim.lr, c.steps) == (1e-3, 10)


def test_apply_overrides_names_unknown_keys_and_bad_types():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.lrr'.*valid keys at optim: lr, name"):
    sweep.apply_overrides(_config(), {'optim.lrr': 1.0})
  with pytest.raises(config_lib.ConfigError, match=r'sweep override steps=.*'):
    sweep.apply_overrides(_config(), {'steps': 'ten'})


def test_final_metrics_from_the_return_value_else_the_metrics_file(tmp_path):
  assert point.final_metrics({'a': 1, 'b': 2.5}, tmp_path) == {'a': 1.0, 'b': 2.5}
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'metrics.jsonl').write_text('{"step": 9, "z": 9.0}\n')
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0, "tag": "x"}\n')
  # Not a dict of numbers: the last record of the shallowest metrics.jsonl.
  assert point.final_metrics({'config': {}, 'final': True}, tmp_path) == {'step': 2, 'loss': 2.0}
  assert point.final_metrics(None, tmp_path / 'sub') == {'step': 9, 'z': 9.0}
  assert point.final_metrics(None, tmp_path / 'missing') == {}


def test_the_example_sweep_has_four_valid_points():
  points = sweep.load_sweep(f'{ROOT}/configs/sweeps/rm_lr.py:test')
  assert len(points) == 4 and len(set(sweep.unique_names(points))) == 4
  base = config_lib.load_config_file(f'{ROOT}/configs/sweeps/rm_lr.py:test')
  assert base.train.steps == config_lib.load_config_file(f'{ROOT}/configs/rm.py:test').train.steps
  for p in points:
    sweep.apply_overrides(base, p)
