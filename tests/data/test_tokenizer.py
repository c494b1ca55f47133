"""Tokenizers: byte ids by hand, HF wrapper on a tokenizer trained here, dict round trips."""
import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers, decoders

from rmjax.data import tokenizer as tk

CORPUS = ['the blik vorpa a zun.', 'a zun vorpu the bliks.', 'the tiny model reads bytes.'] * 20


@pytest.fixture(scope='module')
def hf_json() -> str:
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<pad>', '<s>', '</s>', '<unk>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  return tok.to_str()


def test_byte_ids_by_hand():
  t = tk.ByteTokenizer()
  # 'a' = 0x61 = 97 -> 100; 'é' = C3 A9 = 195, 169 -> 198, 172.
  assert t.encode('aé') == [100, 198, 172]
  assert t.encode('a', add_bos=True, add_eos=True) == [1, 100, 2]
  assert (t.pad_id, t.bos_id, t.eos_id, t.vocab_size) == (0, 1, 2, 259)
  assert t.vocab_size <= 512


def test_byte_decode_drops_specials_and_round_trips():
  t = tk.ByteTokenizer()
  text = 'the blik, vorpa: ünïcode ok.'
  ids = t.encode(text, add_bos=True, add_eos=True)
  assert t.decode(ids + [t.pad_id] * 3) == text
  assert t.decode([0, 100, 1, 101, 2]) == 'ab'
  assert t.decode([100, 259, 101, 511, -1]) == 'a\ufffdb\ufffd\ufffd'  # ids past the vocabulary.


def test_byte_to_dict_round_trip():
  t = tk.ByteTokenizer()
  d = json.loads(json.dumps(t.to_dict()))
  assert tk.tokenizer_from_dict(d) == t


def test_hf_specials_read_from_file_and_encode(hf_json):
  t = tk.HFTokenizer(hf_json)
  raw = tokenizers.Tokenizer.from_str(hf_json)
  assert t.pad_id == raw.token_to_id('<pad>') == 0
  assert t.bos_id == raw.token_to_id('<s>') == 1
  assert t.eos_id == raw.token_to_id('</s>') == 2
  assert t.vocab_size == raw.get_vocab_size()
  text = 'the blik vorpa a zun.'
  ids = t.encode(text)
  assert ids == raw.encode(text).ids
  assert len(ids) < len(text)  # merges learned on the corpus shorten the sequence.
  assert t.encode(text, add_bos=True, add_eos=True) == [1] + ids + [2]
  assert t.decode([t.bos_id] + ids + [t.eos_id, t.pad_id]) == text
  assert t.decode(ids[:2] + [t.vocab_size + 5] + ids[2:]) == (
      t.decode(ids[:2]) + '\ufffd' + t.decode(ids[2:]))


def test_hf_specials_given(hf_json, tmp_path):
  path = tmp_path / 'tokenizer.json'
  path.write_text(hf_json)
  t = tk.HFTokenizer.from_file(path, pad_token='<unk>', eos_id=1)
  assert (t.pad_id, t.bos_id, t.eos_id) == (3, 1, 1)
  with pytest.raises(ValueError, match='bos_token'):
    tk.HFTokenizer(hf_json, bos_token='<nope>')
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tk.HFTokenizer(hf_json, pad_id=10_000)
  with pytest.raises(ValueError, match='no file'):
    tk.HFTokenizer.from_file(tmp_path / 'missing.json')


def test_hf_missing_specials_raise_with_hint():
  tok = tokenizers.Tokenizer(models.WordLevel({'a': 0, 'b': 1, '[UNK]': 2}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  with pytest.raises(ValueError, match='pass pad_id= or pad_token='):
    tk.HFTokenizer.from_tokenizer(tok)
  t = tk.HFTokenizer.from_tokenizer(tok, pad_id=2, bos_id=2, eos_id=2)
  assert t.encode('a b a') == [0, 1, 0]


def test_hf_to_dict_round_trip(hf_json):
  t = tk.HFTokenizer(hf_json, pad_token='<unk>')
  d = json.loads(json.dumps(t.to_dict()))
  t2 = tk.tokenizer_from_dict(d)
  assert isinstance(t2, tk.HFTokenizer) and t2 == t
  assert t2.pad_id == 3
  assert t2.encode('a zun vorpu.') == t.encode('a zun vorpu.')


def test_from_dict_errors():
  with pytest.raises(ValueError, match='unknown kind'):
    tk.tokenizer_from_dict({'kind': 'sentencepiece'})
  with pytest.raises(ValueError, match='needs keys'):
    tk.tokenizer_from_dict({'kind': 'hf'})
  with pytest.raises(ValueError, match='expected a str'):
    tk.ByteTokenizer().encode(b'bytes')
