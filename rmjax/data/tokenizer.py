"""Tokenizers: one interface, a built-in byte tokenizer and a Hugging Face wrapper.

Every tokenizer maps text to a list of int ids and back, exposes the ids of its three
special tokens (pad, bos, eos) and serializes itself to a JSON-able dict from which
`tokenizer_from_dict` rebuilds it with no other file (so a checkpoint can carry the
tokenizer it was trained with).
"""
from __future__ import annotations

import abc
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import tokenizers

_REPLACEMENT = '\ufffd'.encode('utf-8')


class Tokenizer(abc.ABC):
  """Text <-> token ids, with pad / bos / eos special tokens."""

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text` without any special token."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens (pad, bos, eos) are dropped.

    An id outside [0, vocab_size) (a model's vocabulary is often padded past the
    tokenizer's) decodes to U+FFFD instead of raising, so sampled text stays decodable.
    """

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids: every id is in [0, vocab_size)."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Id used to right-pad sequences."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """Id of the beginning-of-sequence token."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id of the end-of-sequence token."""

  @abc.abstractmethod
  def to_dict(self) -> dict[str, Any]:
    """JSON-able description; `tokenizer_from_dict` rebuilds the tokenizer from it."""

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text`, optionally framed as [bos] + ids + [eos]."""
    if not isinstance(text, str):
      raise ValueError(f'{type(self).__name__}.encode: expected a str, got {type(text).__name__}.')
    ids = self._encode(text)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.pad_id, self.bos_id, self.eos_id))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes plus three specials.

  Ids: pad = 0, bos = 1, eos = 2, and byte b (0..255) -> b + 3; vocab_size = 259, which
  fits in the `tiny` model's vocabulary of 512. Decoding drops specials and replaces
  invalid UTF-8 sequences and ids >= 259 with U+FFFD.
  """
  OFFSET = 3

  def _encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode('utf-8')]

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        out += _REPLACEMENT
      elif i >= self.OFFSET:
        out.append(i - self.OFFSET)
    return out.decode('utf-8', errors='replace')

  @property
  def vocab_size(self) -> int:
    return 256 + self.OFFSET

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'byte'}

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash('ByteTokenizer')


# Conventional spellings searched among a file's special tokens when an id is not given.
_CONVENTIONAL = {
    'pad': ('<pad>', '[PAD]', '<|pad|>', '<|padding|>'),
    'bos': ('<s>', '<bos>', '[BOS]', '<|begin_of_text|>', '<|startoftext|>', '[CLS]', '<|endoftext|>'),
    'eos': ('</s>', '<eos>', '[EOS]', '<|end_of_text|>', '<|endoftext|>', '<|im_end|>', '[SEP]'),
}


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` JSON tokenizer.

  Special ids are taken, in order, from the `pad_id` / `bos_id` / `eos_id` arguments, from
  `pad_token` / `bos_token` / `eos_token` (looked up in the vocabulary), from the file's
  padding settings (pad only), and last from the file's special tokens with a conventional
  spelling (`<pad>`, `<s>`, `</s>`, `[PAD]`, `<|endoftext|>`, ...). `encode` never adds the
  file's own post-processing specials: bos / eos are added only when asked.
  """

  def __init__(self, json_text: str, *, pad_id: int | None = None, bos_id: int | None = None,
               eos_id: int | None = None, pad_token: str | None = None, bos_token: str | None = None,
               eos_token: str | None = None):
    try:
      self._tok = tokenizers.Tokenizer.from_str(json_text)
    except Exception as e:  # the library raises a bare Exception on malformed JSON.
      raise ValueError(f'HFTokenizer: could not read the tokenizer JSON ({e}).') from e
    self._json = json_text
    self._ids = {
        'pad': self._resolve('pad', pad_id, pad_token),
        'bos': self._resolve('bos', bos_id, bos_token),
        'eos': self._resolve('eos', eos_id, eos_token),
    }

  @classmethod
  def from_file(cls, path: str | pathlib.Path, **specials: Any) -> 'HFTokenizer':
    """Reads a `tokenizer.json` file; `specials` as in the constructor."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f'HFTokenizer.from_file: no file at {path}.')
    return cls(path.read_text(encoding='utf-8'), **specials)

  @classmethod
  def from_tokenizer(cls, tok: tokenizers.Tokenizer, **specials: Any) -> 'HFTokenizer':
    """Wraps an in-memory `tokenizers.Tokenizer`; `specials` as in the constructor."""
    return cls(tok.to_str(), **specials)

  def _resolve(self, kind: str, given_id: int | None, given_token: str | None) -> int:
    size = self._tok.get_vocab_size(with_added_tokens=True)
    if given_id is not None:
      if not 0 <= int(given_id) < size:
        raise ValueError(f'HFTokenizer: {kind}_id={given_id} is outside the vocabulary [0, {size}).')
      return int(given_id)
    if given_token is not None:
      tid = self._tok.token_to_id(given_token)
      if tid is None:
        raise ValueError(f'HFTokenizer: {kind}_token={given_token!r} is not in the vocabulary.')
      return tid
    if kind == 'pad' and self._tok.padding is not None:
      return int(self._tok.padding['pad_id'])
    specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    for name in _CONVENTIONAL[kind]:
      if name in specials:
        return specials[name]
    raise ValueError(f'HFTokenizer: cannot tell which token is {kind}; pass {kind}_id= or {kind}_token=. '
                     f'The file\'s special tokens are {sorted(specials)}.')

  def _encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    runs: list[list[int]] = [[]]
    for i in map(int, ids):
      if not 0 <= i < self.vocab_size:
        runs.append([])
      elif i not in self.special_ids:
        runs[-1].append(i)
    return '\ufffd'.join(self._tok.decode(run, skip_special_tokens=True) for run in runs)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._ids['pad']

  @property
  def bos_id(self) -> int:
    return self._ids['bos']

  @property
  def eos_id(self) -> int:
    return self._ids['eos']

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'hf', 'json': self._json, 'pad_id': self.pad_id, 'bos_id': self.bos_id,
            'eos_id': self.eos_id}

  def __eq__(self, other: object) -> bool:
    return isinstance(other, HFTokenizer) and self.to_dict() == other.to_dict()

  def __hash__(self) -> int:
    return hash(json.dumps(self.to_dict(), sort_keys=True))


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
  """Rebuilds a tokenizer from its `to_dict()`."""
  if not isinstance(d, dict) or 'kind' not in d:
    raise ValueError(f'tokenizer_from_dict: expected a dict with a "kind" key, got {d!r:.80}.')
  kind = d['kind']
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'hf':
    missing = sorted({'json', 'pad_id', 'bos_id', 'eos_id'} - set(d))
    if missing:
      raise ValueError(f'tokenizer_from_dict: kind "hf" needs keys {missing}.')
    return HFTokenizer(d['json'], pad_id=d['pad_id'], bos_id=d['bos_id'], eos_id=d['eos_id'])
  raise ValueError(f'tokenizer_from_dict: unknown kind {kind!r}; known kinds are ["byte", "hf"].')
