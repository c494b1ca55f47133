"""Tests for rmjax.train.metrics: JSONL format, torn-line repair, resume truncation, TensorBoard."""
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rmjax.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def _lines(workdir: pathlib.Path) -> list[str]:
  return (workdir / 'metrics.jsonl').read_text().splitlines()


def test_format_is_one_json_object_per_line(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {'train/loss': 0.5, 'train/acc': np.float32(0.25), 'n': 3})
    writer.write(2, {'train/loss': 0.125})
  raw = (tmp_path / 'metrics.jsonl').read_text()
  assert raw == ('{"step": 1, "train/loss": 0.5, "train/acc": 0.25, "n": 3.0}\n'
                 '{"step": 2, "train/loss": 0.125}\n')
  assert metrics_lib.read_metrics(tmp_path) == [
      {'step': 1, 'train/loss': 0.5, 'train/acc': 0.25, 'n': 3.0}, {'step': 2, 'train/loss': 0.125}]


def test_nonfinite_values_round_trip_as_json_strings(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path) as writer:  # TensorBoard takes non-finite values too
    writer.write(3, {'a': float('nan'), 'b': float('inf'), 'c': -np.inf, 'd': -0.0})
  (line,) = _lines(tmp_path)
  assert json.loads(line) == {'step': 3, 'a': 'NaN', 'b': 'Infinity', 'c': '-Infinity', 'd': -0.0}
  json.loads(line, parse_constant=lambda name: pytest.fail(f'non-JSON literal {name}'))  # strict JSON
  (record,) = metrics_lib.read_metrics(tmp_path / 'metrics.jsonl')
  assert math.isnan(record['a']) and record['b'] == math.inf and record['c'] == -math.inf
  assert math.copysign(1.0, record['d']) == -1.0


@pytest.mark.parametrize('tail', [b'{"step": 3, "loss": 0.', b'{"step": 3, "lo\n', b'\x00\x00\x00\n'])
def test_torn_last_line_is_repaired_on_open(tmp_path, tail):
  path = tmp_path / 'metrics.jsonl'
  good = b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
  path.write_bytes(good + tail)
  if tail.endswith(b'\n'):  # a reader does not hide a complete malformed line ...
    with pytest.raises(ValueError, match=r'metrics.jsonl:3'):
      metrics_lib.read_metrics(path)
  else:  # ... but skips one without its newline
    assert [r['step'] for r in metrics_lib.read_metrics(path)] == [1, 2]
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
    assert path.read_bytes() == good
    writer.write(3, {'loss': 0.25})
  assert [r['step'] for r in metrics_lib.read_metrics(path)] == [1, 2, 3]


def test_reader_skips_a_line_being_written(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert metrics_lib.read_metrics(path) == [{'step': 1, 'loss': 1.0}]


def test_resume_drops_steps_after_the_checkpoint_and_keeps_other_files(tmp_path):
  (tmp_path / 'notes.txt').write_text('keep me')
  (tmp_path / 'ckpt').mkdir()
  (tmp_path / 'ckpt' / 'x').write_bytes(b'\x01\x02')
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 8):
      writer.write(step, {'loss': 1.0 / step})
  (tmp_path / 'metrics.jsonl').open('ab').write(b'{"step": 8, "lo')  # killed mid-line

  # Resumed from the checkpoint at step 4: steps 5-8 are written again by the resumed run.
  with metrics_lib.MetricsWriter(tmp_path, resume_step=4, tensorboard=False) as writer:
    assert [r['step'] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3, 4]
    for step in range(5, 9):
      writer.write(step, {'loss': 1.0 / step})
  records = metrics_lib.read_metrics(tmp_path)
  assert [r['step'] for r in records] == list(range(1, 9))
  assert [r['loss'] for r in records] == [1.0 / s for s in range(1, 9)]
  assert (tmp_path / 'notes.txt').read_text() == 'keep me'
  assert (tmp_path / 'ckpt' / 'x').read_bytes() == b'\x01\x02'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'metrics.jsonl', 'notes.txt']


def test_resume_rewrites_when_dropped_lines_are_not_at_the_end(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "a": 1.0}\n{"step": 9, "a": 9.0}\n{"step": 2, "a": 2.0}\n')
  metrics_lib.MetricsWriter(tmp_path, resume_step=2, tensorboard=False).close()
  assert path.read_text() == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl']


def test_bad_input_names_the_fix(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: not a metrics record'):
    metrics_lib.MetricsWriter(tmp_path, resume_step=1, tensorboard=False)
  with pytest.raises(ValueError, match='resume_step'):
    metrics_lib.MetricsWriter(tmp_path / 'w', resume_step=-1, tensorboard=False)
  with metrics_lib.MetricsWriter(tmp_path / 'w', tensorboard=False) as writer:
    with pytest.raises(ValueError, match="'v' at step 1 is not a scalar"):
      writer.write(1, {'v': np.zeros(3)})
    with pytest.raises(ValueError, match='other than "step"'):
      writer.write(1, {'step': 1.0})
    with pytest.raises(ValueError, match='non-negative int'):
      writer.write(1.5, {'v': 1.0})
  with pytest.raises(ValueError, match='closed'):
    writer.write(2, {'v': 1.0})


_TB_CHILD = textwrap.dedent('''
    import sys
    from rmjax.train import metrics as metrics_lib
    writer = metrics_lib.MetricsWriter(sys.argv[1])
    writer.write(1, {'train/loss': 0.5})
    writer.write(2, {'train/loss': 0.25, 'eval/acc': 0.75})
    writer.flush()
    writer.close()
    assert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)
    print('OK')
''')


def test_tensorboard_events_written_without_tensorflow(tmp_path):
  proc = subprocess.run([sys.executable, '-c', _TB_CHILD, str(tmp_path)], cwd=REPO,
                        env=dict(os.environ), capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
  (event_file,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  # Read the events back with tensorboardX's own protobuf classes and the TFRecord framing
  # (8-byte length, 4-byte length CRC, payload, 4-byte payload CRC).
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  data, offset, scalars = event_file.read_bytes(), 0, []
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], 'little')
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  assert scalars == [(1, 'train/loss', 0.5), (2, 'train/loss', 0.25), (2, 'eval/acc', 0.75)]


@pytest.mark.parametrize('torch_first', [False, True])
def test_tensorboard_writer_leaves_torch_unloaded_and_works_beside_it(tmp_path, torch_first):
  # tensorboardX is imported without torch (2 s per process), unless torch is already loaded.
  child = textwrap.dedent(f'''
      import sys
      if {torch_first}:
        import torch
      from rmjax.train import metrics
      with metrics.MetricsWriter(sys.argv[1]) as writer:
        writer.write(1, {{'loss': 0.5}})
      assert ('torch' in sys.modules) == {torch_first}, 'torch import state changed'
      import tensorboardX
      print('OK')
  ''')
  proc = subprocess.run([sys.executable, '-c', child, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
