"""TFDS builders for preference pairs and text corpora, stored as array_record.

Every builder writes `data_dir/<builder name>/<config name>/<version>/` with
`file_format='array_record'` and is read back with `builder.as_data_source(split)`: a
random-access sequence of dicts, with no TensorFlow import on either side (Text fields
come back as UTF-8 `bytes`). Preparing is skipped when that folder exists, and it is
atomic: TFDS writes into a sibling `incomplete.*` folder and renames it on success (the
temporary folder is removed on failure), so a killed run never leaves a half dataset
that a later run would reuse.

Examples are written in generation order (`disable_shuffling=True`, integer keys): the
record at position i of a split is the i-th generated example, which is the `index` the
batching pipeline reports. Shuffling is the pipeline's job.

Schema shared by the preference builders: `prompt_id` int64, `prompt`, `chosen`,
`rejected` Text; `SyntheticPreferences` adds `gold_chosen`, `gold_rejected` float32 and
`flipped` bool. `TextCorpus` has one Text field, `text`.

The config name is the caller's key for what produced the data (for instance
`data_key(description)`, a hash of the policy, gold model and labeling settings), so
that different worlds never collide in one `data_dir`.
"""
from __future__ import annotations

import abc
import dataclasses
import gzip
import hashlib
import json
import math
import pathlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DATASET_VERSION = '1.0.0'
LABELS = ('gold_order', 'bradley_terry')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]*')

Candidate = tuple[int, str, str, str, float, float]


def data_key(description: Any, length: int = 16) -> str:
  """A stable config name: the first `length` hex digits of sha256(JSON of `description`).

  `description` must be JSON-able (dict keys are sorted, so key order does not matter).
  """
  try:
    text = json.dumps(description, sort_keys=True, separators=(',', ':'))
  except TypeError as e:
    raise ValueError(f'data_key: the description must be JSON-able ({e}).') from e
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:length]


def _check_key(builder: str, key: str) -> None:
  if not isinstance(key, str) or not _NAME.fullmatch(key):
    raise ValueError(f'{builder}: key {key!r} (the config name) must be letters, digits, "_" or "-" (for example '
                     'data_key(...) of what produced the data).')


def _check_split_sizes(builder: str, split_sizes: Mapping[str, int]) -> None:
  if not split_sizes:
    raise ValueError(f'{builder}: split_sizes is empty; give e.g. {{"train": 1000, "test": 200}}.')
  for split, size in split_sizes.items():
    if not _NAME.fullmatch(split) or not isinstance(size, int) or size <= 0:
      raise ValueError(f'{builder}: split {split!r} with size {size!r}: names must be letters, digits, '
                       '"_" or "-", and sizes positive integers.')


def _text() -> tfds.features.Text:
  return tfds.features.Text()


def preference_features(synthetic: bool = False) -> tfds.features.FeaturesDict:
  """The shared preference schema; `synthetic` adds gold scores and the flip flag."""
  spec: dict[str, Any] = {'prompt_id': np.int64, 'prompt': _text(), 'chosen': _text(), 'rejected': _text()}
  if synthetic:
    spec.update(gold_chosen=np.float32, gold_rejected=np.float32, flipped=np.bool_)
  return tfds.features.FeaturesDict(spec)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose data comes from the config (no download); array_record by default."""
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: 'First release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """No code folder: these builders download nothing, so there is no checksums file.

    (TFDS 4.9.10 resolves the code folder of a builder defined in a package through the
    `importlib_resources` backport, which is not a dependency of rmjax.)
    """
    return None

  def __init__(self, *, data_dir: str | pathlib.Path, config: tfds.core.BuilderConfig,
               file_format: str = 'array_record'):
    if data_dir is None:
      raise ValueError(f'{type(self).__name__}: give data_dir (the folder that holds prepared datasets).')
    _check_key(type(self).__name__, config.name)
    super().__init__(data_dir=data_dir, config=config, file_format=file_format)

  @abc.abstractmethod
  def _features(self) -> tfds.features.FeaturesDict:
    """The dataset's features."""

  def _metadata(self) -> dict[str, Any]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__.split('\n')[0],
                                 features=self._features(), disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(self._metadata()))


# --------------------------------------------------------------------------- synthetic


@dataclasses.dataclass(eq=False)
class SyntheticPreferencesConfig(tfds.core.BuilderConfig):
  """How pairs are produced and labeled.

  candidates: split -> iterable of (prompt_id, prompt, response_a, response_b, gold_a,
    gold_b): the caller samples two responses from its policy and scores both with its
    gold reward model. Only the first `split_sizes[split]` items are used. May be None to read
    an already prepared dataset.
  split_sizes: split name -> number of pairs.
  label: 'gold_order' (chosen = the higher gold score, ties broken by a seeded coin) or
    'bradley_terry' (chosen = a with probability sigmoid((gold_a - gold_b) / bt_temperature)).
  flip_prob: share of labels swapped after labeling (seeded). With 'bradley_terry' it must
    be 0 unless allow_flip_with_bt=True (BT sampling is already label noise).
  seed: labels of example i of a split use the generator seeded by (seed, split, i), so
    they do not depend on the order or number of other examples.
  """
  candidates: Callable[[str], Iterable[Candidate]] | None = None
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=lambda: {'train': 1000, 'test': 200})
  label: str = 'gold_order'
  flip_prob: float = 0.0
  bt_temperature: float = 1.0
  allow_flip_with_bt: bool = False
  seed: int = 0

  def __post_init__(self):
    where = 'SyntheticPreferences'
    _check_split_sizes(where, self.split_sizes)
    if self.label not in LABELS:
      raise ValueError(f'{where}: label={self.label!r}; expected one of {list(LABELS)}.')
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f'{where}: flip_prob={self.flip_prob} must be in [0, 1].')
    if not self.bt_temperature > 0:
      raise ValueError(f'{where}: bt_temperature={self.bt_temperature} must be positive.')
    if self.label == 'bradley_terry' and self.flip_prob > 0 and not self.allow_flip_with_bt:
      raise ValueError(f'{where}: flip_prob={self.flip_prob} on top of label="bradley_terry" stacks two '
                       'kinds of label noise; set flip_prob=0, or allow_flip_with_bt=True if that is meant.')

  def labeling(self) -> dict[str, Any]:
    """The labeling settings, as stored in the dataset's metadata."""
    return {'label': self.label, 'flip_prob': self.flip_prob, 'bt_temperature': self.bt_temperature,
            'allow_flip_with_bt': self.allow_flip_with_bt, 'seed': self.seed,
            'split_sizes': dict(self.split_sizes)}


def label_pair(config: SyntheticPreferencesConfig, split: str, i: int, gold_a: float,
               gold_b: float) -> tuple[bool, bool]:
  """(a is chosen, flipped) for example `i` of `split`; flipped = gold_chosen < gold_rejected."""
  u_label, u_flip = np.random.default_rng([config.seed, zlib.crc32(split.encode()), i]).random(2)
  if config.label == 'gold_order':
    a_chosen = gold_a > gold_b if gold_a != gold_b else u_label < 0.5
  else:
    z = (gold_a - gold_b) / config.bt_temperature
    p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    a_chosen = u_label < p_a
  if u_flip < config.flip_prob:
    a_chosen = not a_chosen
  gold_chosen, gold_rejected = (gold_a, gold_b) if a_chosen else (gold_b, gold_a)
  return a_chosen, gold_chosen < gold_rejected


class SyntheticPreferences(_LocalBuilder, skip_registration=True):
  """Preference pairs sampled from a policy and labeled by a gold reward model."""
  BUILDER_CONFIG_CLASS = SyntheticPreferencesConfig

  def __init__(self, *, data_dir: str | pathlib.Path, config: SyntheticPreferencesConfig | None = None,
               key: str | None = None, **config_kwargs: Any):
    """Pass either `config`, or `key` (the config name) plus `SyntheticPreferencesConfig` fields."""
    if (config is None) == (key is None):
      raise ValueError('SyntheticPreferences: pass exactly one of config= or key= (with config fields).')
    if config is None:
      fields = {f.name for f in dataclasses.fields(SyntheticPreferencesConfig)} - {'name'}
      unknown = sorted(set(config_kwargs) - fields)
      if unknown:
        raise ValueError(f'SyntheticPreferences: unknown arguments {unknown}; valid config fields are '
                         f'{sorted(fields)}.')
      config = SyntheticPreferencesConfig(name=key, **config_kwargs)
    elif config_kwargs:
      raise ValueError(f'SyntheticPreferences: {sorted(config_kwargs)} given with config=; put them in the config.')
    super().__init__(data_dir=data_dir, config=config)

  def _features(self):
    return preference_features(synthetic=True)

  def _metadata(self):
    return self.builder_config.labeling()

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if cfg.candidates is None:
      raise ValueError(f'SyntheticPreferences: {self.data_path} is not prepared and no candidates= '
                       'callable was given to generate it.')
    return {split: self._generate_examples(split, size) for split, size in cfg.split_sizes.items()}

  def _generate_examples(self, split: str, size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    i = -1
    for i, row in enumerate(cfg.candidates(split)):
      if i == size:
        return
      prompt_id, prompt, a, b, gold_a, gold_b = _check_candidate(split, i, row)
      a_chosen, flipped = label_pair(cfg, split, i, gold_a, gold_b)
      chosen, rejected = (a, b) if a_chosen else (b, a)
      gold_chosen, gold_rejected = (gold_a, gold_b) if a_chosen else (gold_b, gold_a)
      yield i, {'prompt_id': prompt_id, 'prompt': prompt, 'chosen': chosen, 'rejected': rejected,
                'gold_chosen': gold_chosen, 'gold_rejected': gold_rejected, 'flipped': flipped}
    if i + 1 < size:
      raise ValueError(f'SyntheticPreferences: candidates({split!r}) gave {i + 1} rows; '
                       f'split_sizes[{split!r}]={size} were asked.')


def _check_candidate(split: str, i: int, row: Any) -> Candidate:
  where = f'SyntheticPreferences: candidates({split!r}) row {i}'
  if not isinstance(row, (tuple, list)) or len(row) != 6:
    raise ValueError(f'{where}: expected (prompt_id, prompt, response_a, response_b, gold_a, gold_b), '
                     f'got {row!r:.120}.')
  prompt_id, prompt, a, b, gold_a, gold_b = row
  if isinstance(prompt_id, bool) or not isinstance(prompt_id, (int, np.integer)):
    raise ValueError(f'{where}: prompt_id must be an int, got {prompt_id!r}.')
  for field, value in (('prompt', prompt), ('response_a', a), ('response_b', b)):
    if not isinstance(value, str):
      raise ValueError(f'{where}: {field} must be a str, got {type(value).__name__}.')
  gold_a, gold_b = float(gold_a), float(gold_b)
  if not (math.isfinite(gold_a) and math.isfinite(gold_b)):
    raise ValueError(f'{where}: gold scores must be finite, got {gold_a}, {gold_b}.')
  return int(prompt_id), prompt, a, b, gold_a, gold_b


# --------------------------------------------------------------------------- JSONL


def _files_fingerprint(files: Mapping[str, Sequence[str | pathlib.Path]]) -> str:
  digest = {}
  for split, paths in files.items():
    digest[split] = [hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths]
  return data_key(digest)


def _check_files(builder: str, files: Mapping[str, Sequence[str | pathlib.Path]]) -> None:
  if not files:
    raise ValueError(f'{builder}: files is empty; give {{"train": [path, ...], ...}}.')
  for split, paths in files.items():
    if not _NAME.fullmatch(split):
      raise ValueError(f'{builder}: split name {split!r} must be letters, digits, "_" or "-".')
    if isinstance(paths, (str, pathlib.Path)) or not paths:
      raise ValueError(f'{builder}: files[{split!r}] must be a non-empty list of paths.')
    for p in paths:
      if not pathlib.Path(p).is_file():
        raise ValueError(f'{builder}: no file at {p} (split {split!r}).')


def jsonl_rows(path: str | pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) of each non-blank line of a `.jsonl` (or `.jsonl.gz`) file; bad JSON
  raises naming file:line."""
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}).') from e
      if not isinstance(row, dict):
        raise ValueError(f'{path}:{lineno}: expected a JSON object, got {type(row).__name__}.')
      yield lineno, row


@dataclasses.dataclass(eq=False)
class JsonlPreferencesConfig(tfds.core.BuilderConfig):
  """files: split -> JSONL paths. Each line: {"prompt": str, "chosen": str, "rejected": str,
  "prompt_id": int (optional)}; other fields are ignored, blank lines skipped.
  """
  files: Mapping[str, Sequence[str | pathlib.Path]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_files('JsonlPreferences', self.files)


class JsonlPreferences(_LocalBuilder, skip_registration=True):
  """Preference pairs from local JSONL files.

  prompt_id: either every row gives one, or none does; then ids are assigned per distinct
  prompt text in order of first appearance (splits in the order given, files in order,
  lines in order), so the same files give the same ids on every run and the same prompt
  has the same id in every split. A malformed row raises a ValueError naming file and line.
  """
  BUILDER_CONFIG_CLASS = JsonlPreferencesConfig

  def __init__(self, *, data_dir: str | pathlib.Path, files: Mapping[str, Sequence[str | pathlib.Path]],
               key: str | None = None):
    """`key` (the config name) defaults to a hash of the files' contents."""
    _check_files('JsonlPreferences', files)
    key = key if key is not None else _files_fingerprint(files)
    super().__init__(data_dir=data_dir, config=JsonlPreferencesConfig(name=key, files=dict(files)))

  def _features(self):
    return preference_features()

  def _split_generators(self, dl_manager):
    del dl_manager
    rows = {split: list(self._read(split)) for split in self.builder_config.files}
    for split, split_rows in rows.items():
      if not split_rows:
        raise ValueError(f'JsonlPreferences: the files of split {split!r} have no rows.')
    flat = [(where, r) for split_rows in rows.values() for where, r in split_rows]
    with_id = [where for where, r in flat if 'prompt_id' in r]
    without_id = [where for where, r in flat if 'prompt_id' not in r]
    if with_id and without_id:
      raise ValueError(f'{without_id[0]}: no "prompt_id", but {with_id[0]} has one; give it in every row '
                       'or in none.')
    ids: dict[str, int] = {}
    for split_rows in rows.values():
      for _, r in split_rows:
        if 'prompt_id' not in r:
          ids.setdefault(r['prompt'], len(ids))
    return {split: self._generate_examples(split_rows, ids) for split, split_rows in rows.items()}

  def _read(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in self.builder_config.files[split]:
      path = pathlib.Path(p)
      for lineno, row in jsonl_rows(path):
        where = f'{path}:{lineno}'
        for field in ('prompt', 'chosen', 'rejected'):
          if field not in row:
            raise ValueError(f'{where}: missing field "{field}" (each row needs "prompt", "chosen", "rejected").')
          if not isinstance(row[field], str):
            raise ValueError(f'{where}: field "{field}" must be a string, got {type(row[field]).__name__}.')
        if 'prompt_id' in row and (isinstance(row['prompt_id'], bool) or not isinstance(row['prompt_id'], int)):
          raise ValueError(f'{where}: field "prompt_id" must be an integer, got {row["prompt_id"]!r}.')
        yield where, row

  def _generate_examples(self, rows, ids) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, (_, r) in enumerate(rows):
      yield i, {'prompt_id': r['prompt_id'] if 'prompt_id' in r else ids[r['prompt']],
                'prompt': r['prompt'], 'chosen': r['chosen'], 'rejected': r['rejected']}


# --------------------------------------------------------------------------- text corpus


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """Either `documents` (split -> iterable of str; the first split_sizes[split] are used)
  with `split_sizes`, or `files` (split -> paths): `.jsonl` files give one document per line from
  its "text" field; other files give one document per non-blank line.
  """
  documents: Callable[[str], Iterable[str]] | None = None
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  files: Mapping[str, Sequence[str | pathlib.Path]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.files and (self.documents is not None or self.split_sizes):
      raise ValueError('TextCorpus: give either files=, or documents= with split_sizes=, not both.')
    if self.files:
      _check_files('TextCorpus', self.files)
    elif self.split_sizes:
      _check_split_sizes('TextCorpus', self.split_sizes)


class TextCorpus(_LocalBuilder, skip_registration=True):
  """Documents for next-token training, one Text field `text`."""
  BUILDER_CONFIG_CLASS = TextCorpusConfig

  def __init__(self, *, data_dir: str | pathlib.Path, key: str | None = None,
               documents: Callable[[str], Iterable[str]] | None = None,
               split_sizes: Mapping[str, int] | None = None,
               files: Mapping[str, Sequence[str | pathlib.Path]] | None = None):
    """`key` (the config name) is required with `documents` (or to read a prepared corpus);
    with `files` it defaults to a hash of their contents."""
    if key is None:
      if not files:
        raise ValueError('TextCorpus: give key= (the config name) with documents=, or files=.')
      _check_files('TextCorpus', files)
      key = _files_fingerprint(files)
    super().__init__(data_dir=data_dir, config=TextCorpusConfig(
        name=key, documents=documents, split_sizes=dict(split_sizes or {}), files=dict(files or {})))

  def _features(self):
    return tfds.features.FeaturesDict({'text': _text()})

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if cfg.files:
      docs = {split: list(self._read(split)) for split in cfg.files}
      for split, d in docs.items():
        if not d:
          raise ValueError(f'TextCorpus: the files of split {split!r} have no documents.')
      return {split: self._generate_examples(d) for split, d in docs.items()}
    if cfg.documents is None:
      raise ValueError(f'TextCorpus: {self.data_path} is not prepared and neither documents= (with '
                       'split_sizes=) nor files= was given to generate it.')
    if not cfg.split_sizes:
      raise ValueError('TextCorpus: documents= needs split_sizes= (split -> number of documents).')
    return {split: self._generate_examples(self._take(split, size))
            for split, size in cfg.split_sizes.items()}

  def _take(self, split: str, size: int) -> Iterator[str]:
    n = 0
    for n, doc in enumerate(self.builder_config.documents(split), start=1):
      if not isinstance(doc, str):
        raise ValueError(f'TextCorpus: documents({split!r}) item {n - 1} must be a str, got '
                         f'{type(doc).__name__}.')
      yield doc
      if n == size:
        return
    raise ValueError(f'TextCorpus: documents({split!r}) gave {n} documents; split_sizes[{split!r}]={size} '
                     'were asked.')

  def _read(self, split: str) -> Iterator[str]:
    for p in self.builder_config.files[split]:
      path = pathlib.Path(p)
      if path.suffix == '.jsonl':
        for lineno, row in jsonl_rows(path):
          if not isinstance(row.get('text'), str):
            raise ValueError(f'{path}:{lineno}: needs a string field "text".')
          yield row['text']
      else:
        with path.open(encoding='utf-8') as f:
          yield from (line.rstrip('\n') for line in f if line.strip())

  def _generate_examples(self, docs: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, doc in enumerate(docs):
      yield i, {'text': doc}
