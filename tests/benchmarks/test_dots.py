"""`benchmarks.dots`: the shapes it compares, its table on canned times, and the command on `tiny` with both
frameworks' workers (PyTorch from this environment's torch, as `.[hf]` installs it)."""
import sys
from pathlib import Path

import pytest

from benchmarks import common, dots, envs


def test_shapes_are_the_rm_steps_and_decodings_dots():
  got = dots.shapes(common.shape('small'))  # width 256, MLP 688, 8 heads of 32, 4 KV heads, vocabulary 4096
  assert list(got.values()) == [[1024, 256, 1376], [1024, 1376, 256], [256, 1024, 1376],  # 1024-token microbatches
                                [16, 256, 512], [16, 256, 1376], [16, 688, 256], [16, 256, 4096],  # 16 rows
                                [2048, 2048, 2048]]
  assert list(got)[3] == 'decode qkv [16, 256] × [256, 512]'  # (8 + 2·4) heads × 32


def test_table_rates_and_ratio_by_hand():
  shapes = {'a': [2, 3, 4]}  # 2·2·3·4 = 48 FLOPs a call
  times = {'rmjax': {'a': [4.8e-10, 1.0, 4.8e-10]},  # median 4.8e-10 s: 100 GFLOP/s
           'torch': {'a': [2.4e-10, 2.4e-10, 9.0]}}  # median 2.4e-10 s: 200 GFLOP/s
  rows = dots.table(shapes, times, {'rmjax': 'XLA', 'torch': 'PyTorch'}).split('\n')
  assert rows[0] == '| dot | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch |'
  assert rows[2] == '| a | 100 | 200 | 0.50 |'


def test_the_command_on_tiny(monkeypatch, capsys):
  monkeypatch.setattr(envs, 'python', lambda name: Path(sys.executable))
  assert dots.main(['--size', 'tiny', '--repeats', '1']) == 0
  out = capsys.readouterr().out
  rows = [r for r in out.split('\n') if r.startswith('| ') and not r.startswith('| dot')]
  assert len(rows) == len(dots.shapes(common.shape('tiny')))
  for row in rows:
    xla, torch_rate, ratio = (float(c) for c in row.strip('|').split('|')[1:])
    assert xla > 0 and torch_rate > 0 and ratio > 0  # the ratio by hand: test_table_rates_and_ratio_by_hand
  assert 'PyTorch 2.' in out and 'XLA (jax' in out


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit, match='repeats'):
    dots.main(['--repeats', '0'])
  with pytest.raises(ValueError, match='unknown shape'):
    dots.main(['--size', 'huge'])
