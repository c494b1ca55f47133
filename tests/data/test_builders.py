"""TFDS builders: array_record round trips, labeling, JSONL errors, skip-when-prepared, atomicity."""
import itertools
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rmjax.data import builders as B


def toy_candidates(split):
  """Row i: prompt_id i % 4, gold_a = i % 5, gold_b = 2 (a tie when i % 5 == 2)."""
  offset = 0 if split == 'train' else 1000
  for i in range(10**6):
    yield (i % 4, f'prompt {i % 4}', f'a{i + offset}', f'b{i + offset}', float(i % 5), 2.0)


def prepare(builder):
  builder.download_and_prepare()
  return builder


def rows(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


@pytest.fixture(scope='module')
def gold_order(tmp_path_factory):
  return prepare(B.SyntheticPreferences(data_dir=tmp_path_factory.mktemp('syn'), key='world0',
                                        candidates=toy_candidates, split_sizes={'train': 40, 'test': 10}))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_round_trip_gold_order(gold_order):
  assert gold_order.data_path.parts[-3:] == ('synthetic_preferences', 'world0', B.DATASET_VERSION)
  assert gold_order.info.file_format.value == 'array_record'
  train = rows(gold_order, 'train')
  assert len(train) == 40 and len(rows(gold_order, 'test')) == 10
  assert set(train[0]) == {'prompt_id', 'prompt', 'chosen', 'rejected', 'gold_chosen', 'gold_rejected',
                           'flipped'}
  for i, r in enumerate(train):  # written in generation order.
    gold_a = float(i % 5)
    assert r['prompt_id'] == i % 4 and r['prompt'] == f'prompt {i % 4}'.encode()
    assert {r['chosen'], r['rejected']} == {f'a{i}'.encode(), f'b{i}'.encode()}
    if gold_a != 2.0:
      assert r['chosen'] == (f'a{i}' if gold_a > 2 else f'b{i}').encode()
    gold_of = {f'a{i}'.encode(): gold_a, f'b{i}'.encode(): 2.0}
    assert r['gold_chosen'] == gold_of[r['chosen']] and r['gold_rejected'] == gold_of[r['rejected']]
    assert r['gold_chosen'] >= r['gold_rejected'] and not r['flipped']
  ties = [r['chosen'][:1] for i, r in enumerate(train) if i % 5 == 2]
  assert set(ties) == {b'a', b'b'}  # 8 seeded coin flips, not always the same side.


def test_synthetic_metadata_and_read_only_reload(gold_order):
  again = tfds.builder_from_directory(gold_order.data_path)
  assert again.info.metadata['label'] == 'gold_order'
  assert again.info.metadata['split_sizes'] == {'train': 40, 'test': 10}
  assert rows(again, 'train') == rows(gold_order, 'train')


def test_skipped_when_prepared(gold_order):
  def must_not_run(split):
    raise AssertionError('candidates called for a prepared dataset')
  b = prepare(B.SyntheticPreferences(data_dir=gold_order.data_dir_root, key='world0',
                                     candidates=must_not_run, split_sizes={'train': 40, 'test': 10}))
  assert rows(b, 'test') == rows(gold_order, 'test')
  # Reading needs no candidates at all.
  assert len(prepare(B.SyntheticPreferences(data_dir=gold_order.data_dir_root, key='world0'))
             .as_data_source('train')) == 40


def test_keys_do_not_collide(gold_order, tmp_path):
  other = prepare(B.SyntheticPreferences(data_dir=gold_order.data_dir_root, key='world1',
                                         candidates=toy_candidates, split_sizes={'train': 40, 'test': 10},
                                         flip_prob=1.0))
  assert other.data_path != gold_order.data_path
  assert all(r['flipped'] for i, r in enumerate(rows(other, 'train')) if i % 5 != 2)
  assert not any(r['flipped'] for r in rows(gold_order, 'train'))
  assert B.data_key({'policy': 'p', 'gold': 'g', 'n': 3}) == B.data_key({'n': 3, 'gold': 'g', 'policy': 'p'})
  assert B.data_key({'flip_prob': 0.1}) != B.data_key({'flip_prob': 0.2})


def test_writing_is_atomic(tmp_path):
  def fails_midway(split):
    yield from itertools.islice(toy_candidates(split), 5)
    raise RuntimeError('policy crashed')
  b = B.SyntheticPreferences(data_dir=tmp_path, key='w', candidates=fails_midway, split_sizes={'train': 20})
  with pytest.raises(RuntimeError, match='policy crashed'):
    b.download_and_prepare()
  assert not b.data_path.exists()
  assert not [p for p in (tmp_path / 'synthetic_preferences' / 'w').iterdir() if 'incomplete' in p.name]
  good = prepare(B.SyntheticPreferences(data_dir=tmp_path, key='w', candidates=toy_candidates,
                                        split_sizes={'train': 20}))
  assert len(good.as_data_source('train')) == 20


def _config(**kw):
  return B.SyntheticPreferencesConfig(name='x', **kw)


def test_flip_rate():
  cfg = _config(flip_prob=0.3, seed=5)
  n = 4000
  flips = [B.label_pair(cfg, 'train', i, 1.0, 0.0) for i in range(n)]
  assert all(flipped == (not a_chosen) for a_chosen, flipped in flips)
  rate = np.mean([f for _, f in flips])
  assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)  # 5 binomial standard deviations.
  assert flips == [B.label_pair(cfg, 'train', i, 1.0, 0.0) for i in range(n)]  # seeded.
  assert flips != [B.label_pair(_config(flip_prob=0.3, seed=6), 'train', i, 1.0, 0.0) for i in range(n)]


@pytest.mark.parametrize('gap,temperature', [(1.0, 1.0), (-2.0, 1.0), (1.0, 0.5), (0.0, 1.0)])
def test_bradley_terry_rate(gap, temperature):
  cfg = _config(label='bradley_terry', bt_temperature=temperature, seed=1)
  n = 4000
  p = 1.0 / (1.0 + math.exp(-gap / temperature))
  labels = [B.label_pair(cfg, 'test', i, gap, 0.0) for i in range(n)]
  rate = np.mean([a for a, _ in labels])
  assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
  assert all(flipped == ((not a) if gap > 0 else (a and gap < 0)) for a, flipped in labels)


def test_bradley_terry_extremes():
  cold = _config(label='bradley_terry', bt_temperature=1e-6)
  assert all(B.label_pair(cold, 'train', i, 0.01, 0.0)[0] for i in range(200))
  assert not any(B.label_pair(cold, 'train', i, -1e6, 0.0)[0] for i in range(50))  # no overflow.


def test_labeling_errors():
  with pytest.raises(ValueError, match='stacks two'):
    _config(label='bradley_terry', flip_prob=0.1)
  assert _config(label='bradley_terry', flip_prob=0.1, allow_flip_with_bt=True).flip_prob == 0.1
  with pytest.raises(ValueError, match=r"expected one of \['gold_order', 'bradley_terry'\]"):
    _config(label='bt')
  with pytest.raises(ValueError, match='flip_prob'):
    _config(flip_prob=1.5)
  with pytest.raises(ValueError, match='bt_temperature'):
    _config(bt_temperature=0.0)
  with pytest.raises(ValueError, match='sizes positive'):
    _config(split_sizes={'train': 0})


def test_builder_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='the config name'):
    B.SyntheticPreferences(data_dir=tmp_path, key='a/b')
  with pytest.raises(ValueError, match='unknown arguments'):
    B.SyntheticPreferences(data_dir=tmp_path, key='a', flip=0.1)
  with pytest.raises(ValueError, match='exactly one'):
    B.SyntheticPreferences(data_dir=tmp_path)
  with pytest.raises(ValueError, match='no candidates'):
    B.SyntheticPreferences(data_dir=tmp_path, key='unprepared').download_and_prepare()
  with pytest.raises(ValueError, match=r"gave 3 rows; split_sizes\['train'\]=10"):
    B.SyntheticPreferences(data_dir=tmp_path, key='short', split_sizes={'train': 10},
                           candidates=lambda s: itertools.islice(toy_candidates(s), 3)).download_and_prepare()
  with pytest.raises(ValueError, match="row 1: response_a must be a str"):
    B.SyntheticPreferences(data_dir=tmp_path, key='bad', split_sizes={'train': 2},
                           candidates=lambda s: [(0, 'p', 'a', 'b', 1.0, 0.0),
                                                 (0, 'p', 3, 'b', 1.0, 0.0)]).download_and_prepare()
  with pytest.raises(ValueError, match='finite'):
    B.SyntheticPreferences(data_dir=tmp_path, key='nan', split_sizes={'train': 1},
                           candidates=lambda s: [(0, 'p', 'a', 'b', float('nan'), 0.0)]).download_and_prepare()


# --------------------------------------------------------------------------- JSONL


def write_jsonl(path, lines):
  path.write_text('\n'.join(l if isinstance(l, str) else json.dumps(l) for l in lines) + '\n')
  return path


def test_jsonl_ids_by_first_appearance(tmp_path):
  train = write_jsonl(tmp_path / 'train.jsonl', [
      {'prompt': 'q1', 'chosen': 'good', 'rejected': 'bad'},
      {'prompt': 'q2', 'chosen': 'yes', 'rejected': 'no', 'extra': 1},
      '',
      {'prompt': 'q1', 'chosen': 'fine', 'rejected': 'worse'}])
  test = write_jsonl(tmp_path / 'test.jsonl', [
      {'prompt': 'q3', 'chosen': 'é', 'rejected': 'e'},
      {'prompt': 'q2', 'chosen': 'a', 'rejected': 'b'}])
  b = prepare(B.JsonlPreferences(data_dir=tmp_path / 'data', files={'train': [train], 'test': [test]}))
  tr, te = rows(b, 'train'), rows(b, 'test')
  assert [r['prompt_id'] for r in tr] == [0, 1, 0]
  assert [r['prompt_id'] for r in te] == [2, 1]
  assert te[0]['chosen'].decode() == 'é' and tr[2]['rejected'] == b'worse'
  assert set(tr[0]) == {'prompt_id', 'prompt', 'chosen', 'rejected'}
  # The default name hashes the contents: same files -> same name; changed file -> new name.
  same = B.JsonlPreferences(data_dir=tmp_path / 'data', files={'train': [train], 'test': [test]})
  assert same.data_path == b.data_path
  write_jsonl(test, [{'prompt': 'q3', 'chosen': 'x', 'rejected': 'y'}])
  changed = B.JsonlPreferences(data_dir=tmp_path / 'data', files={'train': [train], 'test': [test]})
  assert changed.data_path != b.data_path


def test_jsonl_explicit_ids(tmp_path):
  f = write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'q', 'chosen': 'c', 'rejected': 'r', 'prompt_id': 41},
                                         {'prompt': 'q', 'chosen': 'c2', 'rejected': 'r2', 'prompt_id': 7}])
  b = prepare(B.JsonlPreferences(data_dir=tmp_path, files={'train': [f]}, key='explicit'))
  assert [r['prompt_id'] for r in rows(b, 'train')] == [41, 7]


@pytest.mark.parametrize('bad_line,message,lineno', [
    ('{"prompt": "q", "chosen": "c"', 'invalid JSON', 4),
    ({'prompt': 'q', 'chosen': 'c'}, 'missing field "rejected"', 4),
    ({'prompt': 'q', 'chosen': 1, 'rejected': 'r'}, 'field "chosen" must be a string', 4),
    ({'prompt': 'q', 'chosen': 'c', 'rejected': 'r', 'prompt_id': '3'}, 'field "prompt_id" must be an integer', 4),
    ('[1, 2]', 'expected a JSON object', 4),
    ({'prompt': 'q', 'chosen': 'c', 'rejected': 'r', 'prompt_id': 3}, r'no "prompt_id", but .*:4 has one', 1),
])
def test_jsonl_malformed_row_names_file_and_line(tmp_path, bad_line, message, lineno):
  good = {'prompt': 'q', 'chosen': 'c', 'rejected': 'r'}
  f = write_jsonl(tmp_path / 'prefs.jsonl', [good, '', good, bad_line])
  b = B.JsonlPreferences(data_dir=tmp_path / 'data', files={'train': [f]})
  with pytest.raises(ValueError, match=message) as e:
    b.download_and_prepare()
  assert str(e.value).startswith(f'{f}:{lineno}: ')
  assert not b.data_path.exists()


def test_jsonl_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='no file at'):
    B.JsonlPreferences(data_dir=tmp_path, files={'train': [tmp_path / 'missing.jsonl']})
  with pytest.raises(ValueError, match='non-empty list'):
    B.JsonlPreferences(data_dir=tmp_path, files={'train': str(tmp_path / 'x.jsonl')})
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(ValueError, match='have no rows'):
    B.JsonlPreferences(data_dir=tmp_path, files={'train': [empty]}).download_and_prepare()


# --------------------------------------------------------------------------- text corpus


def test_text_corpus_from_callable_and_files(tmp_path):
  docs = lambda split: (f'{split} doc {i}.' for i in range(10**6))  # noqa: E731
  b = prepare(B.TextCorpus(data_dir=tmp_path, key='lang0', documents=docs, split_sizes={'train': 6, 'test': 2}))
  assert [r['text'] for r in rows(b, 'test')] == [b'test doc 0.', b'test doc 1.']
  assert len(b.as_data_source('train')) == 6
  txt = tmp_path / 'a.txt'
  txt.write_text('first line\n\n second line \n')
  jl = write_jsonl(tmp_path / 'b.jsonl', [{'text': 'from json', 'id': 1}])
  f = prepare(B.TextCorpus(data_dir=tmp_path, files={'train': [txt, jl]}))
  assert [r['text'] for r in rows(f, 'train')] == [b'first line', b' second line ', b'from json']


def test_text_corpus_errors(tmp_path):
  with pytest.raises(ValueError, match='give key='):
    B.TextCorpus(data_dir=tmp_path, documents=lambda s: ['x'], split_sizes={'train': 1})
  with pytest.raises(ValueError, match='not both'):
    B.TextCorpus(data_dir=tmp_path, key='x', documents=lambda s: ['x'], split_sizes={'train': 1},
                 files={'train': [__file__]})
  with pytest.raises(ValueError, match='needs split_sizes'):
    B.TextCorpus(data_dir=tmp_path, key='nosplits', documents=lambda s: ['x']).download_and_prepare()
  with pytest.raises(ValueError, match="gave 1 documents"):
    B.TextCorpus(data_dir=tmp_path, key='short', documents=lambda s: ['x'],
                 split_sizes={'train': 3}).download_and_prepare()
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'text': 'ok'}, {'txt': 'no'}])
  with pytest.raises(ValueError, match=f'{bad}:2: needs a string field "text"'):
    B.TextCorpus(data_dir=tmp_path, files={'train': [bad]}).download_and_prepare()


# --------------------------------------------------------------------------- no TensorFlow


def test_write_and_read_without_tensorflow(tmp_path):
  script = textwrap.dedent(f'''
      import json, sys
      import rmjax.data as data
      from rmjax.data import builders as B
      d = {str(tmp_path)!r}
      g = data.Grammar.random(0)
      prompts = g.prompts(8, seed=0)
      def cands(split):
        for i in range(100):
          yield i % 8, prompts[i % 8], ' a.', ' bb.', float(i % 3), 1.0
      syn = B.SyntheticPreferences(data_dir=d, key='w', candidates=cands, split_sizes={{'train': 16}})
      syn.download_and_prepare()
      open(d + '/p.jsonl', 'w').write(json.dumps({{'prompt': 'q', 'chosen': 'c', 'rejected': 'r'}}) + '\\n')
      js = B.JsonlPreferences(data_dir=d, files={{'train': [d + '/p.jsonl']}})
      js.download_and_prepare()
      tc = B.TextCorpus(data_dir=d, key='c', documents=lambda s: iter(g.documents(4, 0)), split_sizes={{'train': 4}})
      tc.download_and_prepare()
      tok = data.ByteTokenizer()
      pairs = data.PairBatches(syn.as_data_source('train'), tok, seq_len=48, global_batch_size=4, seed=0)
      seqs = data.SequenceBatches(tc.as_data_source('train'), tok, seq_len=48, global_batch_size=2, seed=0)
      assert pairs[5]['chosen_tokens'].shape == (4, 48) and seqs[3]['tokens'].shape == (2, 48)
      assert len(js.as_data_source('train')) == 1
      print('TF_IMPORTED', 'tensorflow' in sys.modules)
  ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'TF_IMPORTED False' in out.stdout
