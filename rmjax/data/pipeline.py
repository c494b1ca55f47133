"""Deterministic, resumable batching with grain random access.

A batcher maps a step index to a batch: `batches[step]` is a pure function of
(source, settings, step), whatever was read before, so a resumed run reads exactly the
batches an uninterrupted run would have read; the step counter in the train state is the
whole iterator state.

Order: epoch e = step // len(batches) visits the source through
`grain.MapDataset.range(n).shuffle(seed=s_e)`, where s_e is drawn from
`np.random.SeedSequence([seed, e])` (grain's own multi-epoch shuffle uses seed + e, which
makes epoch 1 of seed 0 equal epoch 0 of seed 1). Global batch b of the epoch takes
positions [b * B, (b + 1) * B) of that order, B = global_batch_size; process p of P
gets the contiguous rows [p * B / P, (p + 1) * B / P) of it, so the shares of all
processes concatenate to the single-process batch.

Eval mode (`shuffle=False, drop_remainder=False`): one epoch covers every example once
in source order; the last batch is filled with padding rows (a copy of the epoch's first
example with `weight = 0` and `index = -1`), so shapes stay static and padding never
holds an empty sequence.

Token layout (right-padded with pad_id to seq_len, `mask` marks real tokens):
- pairs and supervised rows: [bos]? + prompt + response + [eos]. When too long, the
  sequence keeps its last tokens: the prompt is cut from the left first, then, if the
  response + eos alone is longer than seq_len, the response loses its beginning, so the
  response's end and its eos (where rewards are read) are always kept; bos stays first.
- documents: [bos]? + text + [eos], cut at seq_len on the right.
`loss_mask[t]` marks tokens predicted from tokens < t: every real token but the first for
documents, the response tokens and eos for supervised rows (position 0 never is).
"""
from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from rmjax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of `epoch`: a 32-bit draw from SeedSequence([seed, epoch])."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _text(row: Any, field: str, index: int) -> str:
  value = row[field]
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  raise ValueError(f'source[{index}][{field!r}] must be str or bytes, got {type(value).__name__}.')


def _layout(ids: list[int], is_target: list[bool], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
  """(tokens [T] int32, mask [T] bool, target [T] bool) right-padded to seq_len."""
  tokens = np.full(seq_len, pad_id, np.int32)
  mask = np.zeros(seq_len, bool)
  target = np.zeros(seq_len, bool)
  tokens[:len(ids)] = ids
  mask[:len(ids)] = True
  target[:len(ids)] = is_target
  return tokens, mask, target


def encode_prompt_response(tokenizer: Tokenizer, prompt: str, response: str, seq_len: int,
                           add_bos: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [T] int32, mask [T] bool, response_mask [T] bool) of [bos]? + prompt + response + eos.

  Too long: the last seq_len (- 1 with bos) tokens are kept (the prompt is cut from the
  left, then the response); response_mask marks response tokens and the eos.
  """
  p = tokenizer.encode(prompt)
  r = tokenizer.encode(response) + [tokenizer.eos_id]
  budget = seq_len - int(add_bos)
  ids, resp = (p + r)[-budget:], ([False] * len(p) + [True] * len(r))[-budget:]
  if add_bos:
    ids, resp = [tokenizer.bos_id] + ids, [False] + resp
  return _layout(ids, resp, seq_len, tokenizer.pad_id)


def encode_document(tokenizer: Tokenizer, text: str, seq_len: int,
                    add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [T] int32, mask [T] bool) of [bos]? + text + eos, cut at seq_len on the right."""
  ids = tokenizer.encode(text, add_bos=add_bos, add_eos=True)[:seq_len]
  tokens, mask, _ = _layout(ids, [True] * len(ids), seq_len, tokenizer.pad_id)
  return tokens, mask


class _Batches(abc.ABC):
  """Shared indexing: step -> this process's rows of global batch `step`."""

  def __init__(self, source: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
               seed: int, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
               drop_remainder: bool = True, add_bos: bool = False):
    name = type(self).__name__
    n = len(source)
    if n == 0:
      raise ValueError(f'{name}: the source is empty.')
    if seq_len < 2 + int(add_bos):
      raise ValueError(f'{name}: seq_len={seq_len} is too short; it must hold at least one token and eos'
                       f'{" after bos" if add_bos else ""}.')
    if global_batch_size <= 0:
      raise ValueError(f'{name}: global_batch_size={global_batch_size} must be positive.')
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise ValueError(f'{name}: process_index={process_index} must be in [0, process_count={process_count}).')
    if global_batch_size % process_count:
      raise ValueError(f'{name}: global_batch_size={global_batch_size} is not divisible by '
                       f'process_count={process_count}.')
    if drop_remainder and n < global_batch_size:
      raise ValueError(f'{name}: {n} examples make no full batch of {global_batch_size}; lower '
                       'global_batch_size or pass drop_remainder=False.')
    if not 0 <= seed < 2**32:
      raise ValueError(f'{name}: seed={seed} must be in [0, 2**32).')
    self.source = source
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    self.add_bos = add_bos
    self._check_fields(source[0])

  @abc.abstractmethod
  def _check_fields(self, row: Any) -> None:
    """Raises a ValueError naming the missing fields of a source row."""

  @abc.abstractmethod
  def _encode(self, index: int) -> dict[str, np.ndarray]:
    """The arrays of one row (no batch axis) for source example `index`."""

  def __len__(self) -> int:
    """Global batches per epoch."""
    n, b = len(self.source), self.global_batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def epoch_dataset(self, epoch: int) -> grain.MapDataset:
    """Position in epoch -> encoded row (with its source `index`)."""
    ds = grain.MapDataset.range(len(self.source))
    if self.shuffle:
      ds = ds.shuffle(seed=epoch_seed(self.seed, epoch))
    return ds.map(self._encode_with_index)

  def _encode_with_index(self, index: int) -> dict[str, np.ndarray]:
    row = self._encode(int(index))
    row['index'] = np.int64(index)
    row['weight'] = np.float32(1.0)
    return row

  def __getitem__(self, step: int) -> Batch:
    """This process's share of global batch `step` (steps past one epoch go on into the next)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f'{type(self).__name__}[{step!r}]: the step must be a non-negative integer.')
    epoch, b = divmod(int(step), len(self))
    ds = self.epoch_dataset(epoch)
    start = b * self.global_batch_size + self.process_index * self.batch_size
    rows = []
    for pos in range(start, start + self.batch_size):
      if pos < len(ds):
        rows.append(ds[pos])
      else:
        pad = dict(ds[0])
        pad['index'], pad['weight'] = np.int64(-1), np.float32(0.0)
        rows.append(pad)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def __iter__(self) -> Iterator[Batch]:
    """The batches of epoch 0, in order."""
    return (self[step] for step in range(len(self)))


class PairBatches(_Batches):
  """Preference pairs -> {chosen,rejected}_{tokens [b,T] int32, mask [b,T] bool,
  response_mask [b,T] bool}, prompt_id [b] int64, index [b] int64, weight [b] float32, and,
  when the source has them, gold_chosen / gold_rejected [b] float32 and flipped [b] bool.

  `source`: a random-access sequence of dicts with `prompt_id`, `prompt`, `chosen`,
  `rejected` (str or UTF-8 bytes), e.g. `builder.as_data_source(split)`.
  """

  def _check_fields(self, row: Any) -> None:
    missing = [f for f in ('prompt_id', 'prompt', 'chosen', 'rejected') if f not in row]
    if missing:
      raise ValueError(f'PairBatches: source rows lack fields {missing}; they have {sorted(row)}.')
    self._extra = [f for f in ('gold_chosen', 'gold_rejected', 'flipped') if f in row]

  def _encode(self, index: int) -> dict[str, np.ndarray]:
    row = self.source[index]
    prompt = _text(row, 'prompt', index)
    out = {'prompt_id': np.int64(row['prompt_id'])}
    for side in ('chosen', 'rejected'):
      tokens, mask, resp = encode_prompt_response(self.tokenizer, prompt, _text(row, side, index),
                                                  self.seq_len, self.add_bos)
      out.update({f'{side}_tokens': tokens, f'{side}_mask': mask, f'{side}_response_mask': resp})
    for f in self._extra:
      out[f] = np.bool_(row[f]) if f == 'flipped' else np.float32(row[f])
    return out


class SequenceBatches(_Batches):
  """Rows for next-token training -> tokens [b,T] int32, mask [b,T] bool, loss_mask [b,T]
  bool, index [b] int64, weight [b] float32.

  Pretraining (default): each row's `text_field` is a document; loss on every real token
  after the first. Supervised fine-tuning: give `prompt_field` and `response_field` (e.g.
  'prompt' and 'chosen' of a preference source); loss on the response tokens and eos.
  """

  def __init__(self, source: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
               seed: int, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
               drop_remainder: bool = True, add_bos: bool = False, text_field: str = 'text',
               prompt_field: str | None = None, response_field: str | None = None):
    if (prompt_field is None) != (response_field is None):
      raise ValueError('SequenceBatches: give both prompt_field and response_field (supervised rows), '
                       'or neither (documents in text_field).')
    self.text_field = text_field
    self.prompt_field = prompt_field
    self.response_field = response_field
    super().__init__(source, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     shuffle=shuffle, process_index=process_index, process_count=process_count,
                     drop_remainder=drop_remainder, add_bos=add_bos)

  @property
  def supervised(self) -> bool:
    return self.prompt_field is not None

  def _check_fields(self, row: Any) -> None:
    fields = [self.prompt_field, self.response_field] if self.supervised else [self.text_field]
    missing = [f for f in fields if f not in row]
    if missing:
      raise ValueError(f'SequenceBatches: source rows lack fields {missing}; they have {sorted(row)}.')

  def _encode(self, index: int) -> dict[str, np.ndarray]:
    row = self.source[index]
    if self.supervised:
      tokens, mask, target = encode_prompt_response(
          self.tokenizer, _text(row, self.prompt_field, index), _text(row, self.response_field, index),
          self.seq_len, self.add_bos)
    else:
      tokens, mask = encode_document(self.tokenizer, _text(row, self.text_field, index), self.seq_len,
                                     self.add_bos)
      target = mask.copy()
    target[0] = False
    return {'tokens': tokens, 'mask': mask, 'loss_mask': target}
