"""Tokenizer folders with chat templates, and the published-layout preference builders."""
import gzip
import json

import numpy as np
import pytest

from rmjax.data import ByteTokenizer, PairBatches, chat, hf_datasets

CONVERSATION = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hello there'},
                {'role': 'assistant', 'content': 'hi'}]
# What CHATML renders for CONVERSATION, written out by hand.
RENDERED = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n'
            '<|im_start|>assistant\nhi<|im_end|>\n')


def test_tokenizer_folder_and_chat_template(tokenizer_folders, tmp_path):
  for folder in tokenizer_folders:
    tok, template = chat.load_tokenizer(folder)
    assert [tok.pad_id, tok.bos_id, tok.eos_id] == [0, 1, 4]
    assert template.special_tokens == {'pad_token': '<pad>', 'bos_token': '<s>', 'eos_token': '<|im_end|>'}
    assert template.render(CONVERSATION) == RENDERED
    prompt, response = template.split(CONVERSATION)
    assert prompt == RENDERED[:RENDERED.index('hi<|im_end|>')] and response == 'hi<|im_end|>\n'
    ids = tok.encode(prompt)
    assert ids.count(3) == 3 and ids[0] == 3  # <|im_start|> is one special id, three times
    assert tok.decode(tok.encode('hello there')) == 'hello there'
  tok, template = chat.load_tokenizer(tokenizer_folders[0])
  chat.save_tokenizer(tok, tmp_path, chat_template=template)
  tok2, template2 = chat.load_tokenizer(tmp_path)
  assert tok2 == tok and template2 == template
  with pytest.raises(ValueError, match='last message'):
    template.split(CONVERSATION[:2])
  with pytest.raises(ValueError, match='role'):
    template.render([{'role': 'robot', 'content': 'x'}])


def test_template_matches_transformers(tokenizer_folders):
  import transformers  # the [hf] extra
  theirs = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folders[0]))
  tok, template = chat.load_tokenizer(tokenizer_folders[0])
  for add in (False, True):
    msgs = CONVERSATION if not add else CONVERSATION[:2]
    text = template.render(msgs, add_generation_prompt=add)
    assert text == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add)
    assert tok.encode(text) == theirs(text, add_special_tokens=False)['input_ids']


def _write_jsonl(path, rows, gz=False):
  text = '\n'.join(json.dumps(r) for r in rows) + '\n'
  if gz:
    with gzip.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    path.write_text(text)
  return path


def _read(builder, split='train'):
  builder.download_and_prepare()
  return [{k: v.decode() if isinstance(v, bytes) else v for k, v in r.items()}
          for r in builder.as_data_source(split)]


HH = [
    {'chosen': '\n\nHuman: What is 2+2?\n\nAssistant: 4.', 'rejected': '\n\nHuman: What is 2+2?\n\nAssistant: 5.'},
    {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.',
     'rejected': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: No.'},
    {'chosen': '\n\nHuman: What is 2+2?\n\nAssistant: Four.', 'rejected': '\n\nHuman: What is 2+2?\n\nAssistant: 22'},
]


def test_hh_rlhf(tmp_path):
  train = _write_jsonl(tmp_path / 'train.jsonl.gz', HH, gz=True)
  rows = _read(hf_datasets.PreferenceFiles(data_dir=tmp_path / 'd', files={'train': [train]}, layout='hh_rlhf'))
  assert rows[1] == {'prompt_id': 1, 'prompt': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.'
                                               '\n\nAssistant:', 'chosen': ' Blue.', 'rejected': ' No.'}
  assert [r['prompt_id'] for r in rows] == [0, 1, 0]
  assert (rows[2]['chosen'], rows[2]['rejected']) == (' Four.', ' 22')
  bad = _write_jsonl(tmp_path / 'bad.jsonl', HH[:1] + [{'chosen': HH[0]['chosen'], 'rejected': HH[1]['rejected']}])
  with pytest.raises(ValueError, match=r'bad.jsonl:2: .*do not share a prompt'):
    hf_datasets.PreferenceFiles(data_dir=tmp_path / 'e', files={'train': [bad]},
                                layout='hh_rlhf').download_and_prepare()
  assert not list((tmp_path / 'e').rglob('*.array_record*'))  # nothing was written


def _uf_row(prompt, good, bad):
  user = {'role': 'user', 'content': prompt}
  return {'prompt': prompt, 'prompt_id': 'f' * 64, 'score_chosen': 8.0, 'score_rejected': 3.0,
          'chosen': [user, {'role': 'assistant', 'content': good}],
          'rejected': [user, {'role': 'assistant', 'content': bad}],
          'messages': [user, {'role': 'assistant', 'content': good}]}


def test_ultrafeedback_parquet_with_and_without_template(tmp_path, tokenizer_folders):
  import pyarrow as pa  # installed with tensorflow-datasets
  import pyarrow.parquet as pq
  rows = [_uf_row('hello there', 'hi', 'go away'), _uf_row('be brief', 'ok', 'no, I will not be brief')]
  path = tmp_path / 'train_prefs-00000-of-00001.parquet'
  pq.write_table(pa.Table.from_pylist(rows), path)
  plain = _read(hf_datasets.PreferenceFiles(data_dir=tmp_path / 'a', files={'train': [path]}, layout='ultrafeedback'))
  assert plain[0] == {'prompt_id': 0, 'prompt': '\n\nHuman: hello there\n\nAssistant:', 'chosen': ' hi',
                      'rejected': ' go away'}
  _, template = chat.load_tokenizer(tokenizer_folders[0])
  templated = _read(hf_datasets.PreferenceFiles(data_dir=tmp_path / 'b', files={'train': [path]},
                                                layout='ultrafeedback', chat_template=template))
  assert templated[1] == {'prompt_id': 1, 'prompt': '<|im_start|>user\nbe brief<|im_end|>\n<|im_start|>assistant\n',
                          'chosen': 'ok<|im_end|>\n', 'rejected': 'no, I will not be brief<|im_end|>\n'}
  broken = dict(rows[0], rejected=[{'role': 'user', 'content': 'other'}, {'role': 'assistant', 'content': 'x'}])
  pq.write_table(pa.Table.from_pylist([rows[1], broken]), tmp_path / 'broken.parquet')
  with pytest.raises(ValueError, match=r'broken.parquet:2: .*differ before their last message'):
    hf_datasets.PreferenceFiles(data_dir=tmp_path / 'c', files={'train': [tmp_path / 'broken.parquet']},
                                layout='ultrafeedback').download_and_prepare()


def _hs_row(prompt, response, helpfulness, **other):
  ratings = dict(correctness=3, coherence=4, complexity=1, verbosity=2) | other
  return {'prompt': prompt, 'response': response, 'helpfulness': helpfulness, **ratings}


def test_helpsteer2_pairs_and_ratings(tmp_path):
  rows = [_hs_row('p1', 'a', 3), _hs_row('p1', 'b', 4), _hs_row('p2', 'c', 2, correctness=1),
          _hs_row('p2', 'd', 2, correctness=4)]
  path = _write_jsonl(tmp_path / 'train.jsonl.gz', rows, gz=True)
  b = hf_datasets.PreferenceFiles(data_dir=tmp_path / 'a', files={'train': [path]}, layout='helpsteer2')
  pairs = _read(b)
  assert pairs == [{'prompt_id': 0, 'prompt': 'p1', 'chosen': 'b', 'rejected': 'a'}]  # p2 ties on helpfulness
  assert b.info.metadata['helpsteer2_ties/train/train.jsonl.gz'] == 1
  by_correctness = _read(hf_datasets.PreferenceFiles(data_dir=tmp_path / 'b', files={'train': [path]},
                                                     layout='helpsteer2', attribute='correctness'))
  assert [(r['prompt'], r['chosen']) for r in by_correctness] == [('p2', 'd')]
  ratings = _read(hf_datasets.HelpSteer2Ratings(data_dir=tmp_path / 'c', files={'train': [path]}))
  assert [r['prompt_id'] for r in ratings] == [0, 0, 1, 1]
  assert ratings[2]['correctness'] == np.float32(1) and ratings[1]['helpfulness'] == np.float32(4)
  bad = _write_jsonl(tmp_path / 'bad.jsonl', rows[:1] + [dict(rows[1], helpfulness='high')])
  with pytest.raises(ValueError, match=r'bad.jsonl:2: field "helpfulness" must be a finite number'):
    hf_datasets.HelpSteer2Ratings(data_dir=tmp_path / 'd', files={'train': [bad]}).download_and_prepare()


def test_generic_fields_and_batches(tmp_path):
  rows = [{'question': 'Q: a', 'good': ' yes', 'bad': ' no', 'extra': 1},
          {'question': 'Q: b', 'good': ' fine', 'bad': ' bad'}]
  path = tmp_path / 'pairs.json'
  path.write_text(json.dumps(rows))
  fields = {'prompt': 'question', 'chosen': 'good', 'rejected': 'bad'}
  b = hf_datasets.PreferenceFiles(data_dir=tmp_path / 'a', files={'train': [path]}, layout='generic', fields=fields)
  assert _read(b)[1] == {'prompt_id': 1, 'prompt': 'Q: b', 'chosen': ' fine', 'rejected': ' bad'}
  batch = PairBatches(b.as_data_source('train'), ByteTokenizer(), seq_len=16, global_batch_size=2, seed=0)[0]
  assert batch['chosen_tokens'].shape == (2, 16)
  missing = _write_jsonl(tmp_path / 'missing.jsonl', [rows[0], {'question': 'Q', 'good': 'x'}])
  with pytest.raises(ValueError, match=r'missing.jsonl:2: missing field "bad"'):
    hf_datasets.PreferenceFiles(data_dir=tmp_path / 'b', files={'train': [missing]}, layout='generic',
                                fields=fields).download_and_prepare()
  with pytest.raises(ValueError, match='layout'):
    hf_datasets.PreferenceFiles(data_dir=tmp_path / 'c', files={'train': [path]}, layout='shp')
