"""TFDS builders for preference datasets in the layouts they are published in (array_record).

They read the files a user downloaded (`.jsonl`, `.jsonl.gz`, `.json` lists, `.parquet`)
and write the shared preference schema of `rmjax.data.builders` (`prompt_id` int64,
`prompt`, `chosen`, `rejected` Text), so `PairBatches` and the reward-model trainer take
them as they take `JsonlPreferences`. Layouts (`PreferenceFiles(layout=...)`):

  'hh_rlhf'        Anthropic HH-RLHF: `{"chosen": dialogue, "rejected": dialogue}`, each a
                   full "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript. The prompt is the
                   text up to and including the last "\\n\\nAssistant:" of `chosen`; both
                   dialogues must start with it, the responses are the rest.
  'ultrafeedback'  UltraFeedback binarized: `chosen` / `rejected` message lists
                   (`[{"role", "content"}, ...]`) sharing all turns but the last, an
                   assistant turn (`prompt` and `messages` columns are not needed).
  'helpsteer2'     HelpSteer2: one response per row, `{"prompt", "response", "helpfulness",
                   "correctness", "coherence", "complexity", "verbosity"}`; rows with the same
                   prompt form pairs, chosen = the higher `attribute` rating (ties give no
                   pair; their number is in the dataset metadata). `HelpSteer2Ratings` keeps
                   every row with its ratings as float32 regression targets.
  'generic'        any rows with configurable `fields` (`{"prompt": ..., "chosen": ...,
                   "rejected": ...}`); values are strings, or message lists for chosen /
                   rejected (then the prompt field may be absent).

Message lists become text through a `ChatTemplate` (`rmjax.data.chat`; prompt = earlier
turns + the generation prompt, response = the rest of the rendering), or without one in the
HH-RLHF form ("\\n\\nHuman: ..." / "\\n\\nAssistant:" turns, response " " + content).

Prompt ids are assigned per distinct prompt text in order of first appearance (splits in
the order given, then files, then rows). A malformed row raises a ValueError naming the file
and line (the row number, from 1, for parquet) before any record is written; no row is
dropped silently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rmjax.data import builders
from rmjax.data.chat import ChatTemplate, check_messages

LAYOUTS = ('hh_rlhf', 'ultrafeedback', 'helpsteer2', 'generic')
HELPSTEER2_ATTRIBUTES = ('helpfulness', 'correctness', 'coherence', 'complexity', 'verbosity')
HH_ASSISTANT = '\n\nAssistant:'
_HH_ROLES = {'system': 'System', 'user': 'Human', 'assistant': 'Assistant', 'tool': 'Tool'}
Files = Mapping[str, Sequence[str | pathlib.Path]]


def read_rows(path: str | pathlib.Path) -> Iterator[tuple[str, dict[str, Any]]]:
  """('file:line', row) for every row of a `.jsonl`, `.jsonl.gz`, `.json` (a list) or `.parquet` file."""
  path = pathlib.Path(path)
  name = path.name
  if name.endswith('.parquet'):
    import pyarrow.parquet as pq  # only needed for parquet files
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
      for row in batch.to_pylist():
        n += 1
        yield f'{path}:{n}', row
  elif name.endswith('.json'):
    try:
      rows = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{e.lineno}: invalid JSON ({e.msg}).') from e
    if not isinstance(rows, list):
      raise ValueError(f'{path}:1: a .json file must hold a list of objects (use .jsonl for one per line).')
    for i, row in enumerate(rows, start=1):
      if not isinstance(row, dict):
        raise ValueError(f'{path}:{i}: row {i} is a {type(row).__name__}, not an object.')
      yield f'{path}:{i}', row
  elif name.endswith(('.jsonl', '.jsonl.gz')):
    for lineno, row in builders.jsonl_rows(path):
      yield f'{path}:{lineno}', row
  else:
    raise ValueError(f'{path}: unknown file type; expected .jsonl, .jsonl.gz, .json or .parquet.')


def _string(row: Mapping[str, Any], field: str, where: str) -> str:
  if field not in row:
    raise ValueError(f'{where}: missing field "{field}" (fields present: {sorted(row)}).')
  if not isinstance(row[field], str):
    raise ValueError(f'{where}: field "{field}" must be a string, got {type(row[field]).__name__}.')
  return row[field]


def hh_split(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of two HH-RLHF dialogues."""
  cut = chosen.rfind(HH_ASSISTANT)
  if cut < 0:
    raise ValueError(f'{where}: "chosen" has no "{HH_ASSISTANT.strip()}" turn.')
  prompt = chosen[:cut + len(HH_ASSISTANT)]
  if not rejected.startswith(prompt):
    raise ValueError(f'{where}: "rejected" does not start with the dialogue of "chosen" up to its last '
                     'Assistant turn; the two do not share a prompt.')
  return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _plain_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
  return ''.join(f'\n\n{_HH_ROLES[m["role"]]}: {m["content"]}' for m in messages) + HH_ASSISTANT


def messages_split(chosen: Sequence[Any], rejected: Sequence[Any], where: str,
                   template: ChatTemplate | None) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of two conversations that differ in their last turn."""
  for name, conv in (('chosen', chosen), ('rejected', rejected)):
    check_messages(conv, f'{where}: "{name}"')
    if conv[-1]['role'] != 'assistant':
      raise ValueError(f'{where}: the last message of "{name}" must be the assistant\'s, got {conv[-1]["role"]!r}.')
  if [dict(m) for m in chosen[:-1]] != [dict(m) for m in rejected[:-1]]:
    raise ValueError(f'{where}: "chosen" and "rejected" differ before their last message; they do not share a prompt.')
  if template is None:
    prompt = _plain_prompt(chosen[:-1])
    return prompt, ' ' + chosen[-1]['content'], ' ' + rejected[-1]['content']
  prompt, c = template.split(chosen)
  prompt_r, r = template.split(rejected)
  if prompt_r != prompt:
    raise ValueError(f'{where}: the chat template renders different prompts for "chosen" and "rejected".')
  return prompt, c, r


def _rating(row: Mapping[str, Any], field: str, where: str) -> float:
  value = row.get(field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
    raise ValueError(f'{where}: field "{field}" must be a finite number, got {value!r}.')
  return float(value)


@dataclasses.dataclass(eq=False)
class PreferenceFilesConfig(tfds.core.BuilderConfig):
  """files: split -> paths; layout: one of LAYOUTS; fields: generic field names
  (`prompt`, `chosen`, `rejected`); attribute: the HelpSteer2 rating that orders pairs;
  chat_template: renders message lists (None: the HH-RLHF text form)."""
  files: Files = dataclasses.field(default_factory=dict)
  layout: str = 'generic'
  fields: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {'prompt': 'prompt', 'chosen': 'chosen', 'rejected': 'rejected'})
  attribute: str = 'helpfulness'
  chat_template: ChatTemplate | None = None


def _check(where: str, files: Files, layout: str, fields: Mapping[str, str], attribute: str) -> None:
  builders._check_files(where, files)  # pylint: disable=protected-access
  if layout not in LAYOUTS:
    raise ValueError(f'{where}: layout={layout!r}; expected one of {LAYOUTS}.')
  if set(fields) != {'prompt', 'chosen', 'rejected'}:
    raise ValueError(f'{where}: fields must map exactly "prompt", "chosen", "rejected" to column names; '
                     f'got {sorted(fields)}.')
  if attribute not in HELPSTEER2_ATTRIBUTES:
    raise ValueError(f'{where}: attribute={attribute!r}; expected one of {HELPSTEER2_ATTRIBUTES}.')


def _fingerprint(files: Files, **settings: Any) -> str:
  digest = {split: [hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths]
            for split, paths in files.items()}
  return builders.data_key({'files': digest, **settings})


class PreferenceFiles(builders._LocalBuilder, skip_registration=True):  # pylint: disable=protected-access
  """Preference pairs from downloaded files in a published layout (module docstring)."""
  BUILDER_CONFIG_CLASS = PreferenceFilesConfig

  def __init__(self, *, data_dir: str | pathlib.Path, files: Files, layout: str,
               fields: Mapping[str, str] | None = None, attribute: str = 'helpfulness',
               chat_template: ChatTemplate | None = None, key: str | None = None):
    """`key` (the config name) defaults to a hash of the files' contents and the settings."""
    fields = dict(fields or {'prompt': 'prompt', 'chosen': 'chosen', 'rejected': 'rejected'})
    _check('PreferenceFiles', files, layout, fields, attribute)
    if key is None:
      key = _fingerprint(files, layout=layout, fields=fields, attribute=attribute,
                         chat_template=None if chat_template is None else chat_template.source)
    super().__init__(data_dir=data_dir, config=PreferenceFilesConfig(
        name=key, files=dict(files), layout=layout, fields=fields, attribute=attribute, chat_template=chat_template))

  def _features(self):
    return builders.preference_features()

  def _metadata(self) -> dict[str, Any]:
    cfg = self.builder_config
    return {'layout': cfg.layout, 'fields': dict(cfg.fields), 'attribute': cfg.attribute,
            'chat_template': None if cfg.chat_template is None else cfg.chat_template.source}

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = {split: list(self._pairs(split)) for split in self.builder_config.files}
    ids: dict[str, int] = {}
    for split, rows in pairs.items():
      if not rows:
        raise ValueError(f'PreferenceFiles: the files of split {split!r} give no pairs.')
      for prompt, _, _ in rows:
        ids.setdefault(prompt, len(ids))
    return {split: self._generate_examples(rows, ids) for split, rows in pairs.items()}

  def _pairs(self, split: str) -> Iterator[tuple[str, str, str]]:
    cfg = self.builder_config
    for p in cfg.files[split]:
      if cfg.layout == 'helpsteer2':
        pairs, ties = helpsteer2_pairs(read_rows(p), cfg.attribute)
        self.info.metadata[f'helpsteer2_ties/{split}/{pathlib.Path(p).name}'] = ties
        yield from pairs
        continue
      for where, row in read_rows(p):
        yield self._pair(row, where)

  def _pair(self, row: Mapping[str, Any], where: str) -> tuple[str, str, str]:
    cfg = self.builder_config
    if cfg.layout == 'hh_rlhf':
      return hh_split(_string(row, 'chosen', where), _string(row, 'rejected', where), where)
    names = cfg.fields if cfg.layout == 'generic' else {'prompt': 'prompt', 'chosen': 'chosen',
                                                         'rejected': 'rejected'}
    chosen, rejected = (row.get(names[f]) for f in ('chosen', 'rejected'))
    if cfg.layout == 'ultrafeedback' or (isinstance(chosen, list) and isinstance(rejected, list)):
      for f, v in (('chosen', chosen), ('rejected', rejected)):
        if not isinstance(v, list):
          raise ValueError(f'{where}: field "{names[f]}" must be a list of messages, got {type(v).__name__}.')
      return messages_split(chosen, rejected, where, cfg.chat_template)
    return tuple(_string(row, names[f], where) for f in ('prompt', 'chosen', 'rejected'))

  def _generate_examples(self, rows, ids) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, (prompt, chosen, rejected) in enumerate(rows):
      yield i, {'prompt_id': ids[prompt], 'prompt': prompt, 'chosen': chosen, 'rejected': rejected}


def _helpsteer2_row(row: Mapping[str, Any], where: str) -> tuple[str, str, dict[str, float]]:
  ratings = {a: _rating(row, a, where) for a in HELPSTEER2_ATTRIBUTES}
  return _string(row, 'prompt', where), _string(row, 'response', where), ratings


def helpsteer2_pairs(rows, attribute: str) -> tuple[list[tuple[str, str, str]], int]:
  """Pairs (prompt, chosen, rejected) from HelpSteer2 rows: within each prompt (in order of first
  appearance), every two responses with different `attribute` ratings, the higher chosen; and
  the number of equal-rating pairs, which give no pair."""
  groups: dict[str, list[tuple[str, float]]] = {}
  for where, row in rows:
    prompt, response, ratings = _helpsteer2_row(row, where)
    groups.setdefault(prompt, []).append((response, ratings[attribute]))
  pairs, ties = [], 0
  for prompt, responses in groups.items():
    for i in range(len(responses)):
      for j in range(i + 1, len(responses)):
        (a, ra), (b, rb) = responses[i], responses[j]
        if ra == rb:
          ties += 1
        else:
          pairs.append((prompt, a, b) if ra > rb else (prompt, b, a))
  return pairs, ties


@dataclasses.dataclass(eq=False)
class HelpSteer2RatingsConfig(tfds.core.BuilderConfig):
  """files: split -> HelpSteer2 files (one response per row, five ratings)."""
  files: Files = dataclasses.field(default_factory=dict)


class HelpSteer2Ratings(builders._LocalBuilder, skip_registration=True):  # pylint: disable=protected-access
  """HelpSteer2 rows as regression targets: `prompt_id`, `prompt`, `response`, and each of
  HELPSTEER2_ATTRIBUTES as float32 (the published 0–4 rating)."""
  BUILDER_CONFIG_CLASS = HelpSteer2RatingsConfig

  def __init__(self, *, data_dir: str | pathlib.Path, files: Files, key: str | None = None):
    builders._check_files('HelpSteer2Ratings', files)  # pylint: disable=protected-access
    key = key if key is not None else _fingerprint(files, layout='helpsteer2_ratings')
    super().__init__(data_dir=data_dir, config=HelpSteer2RatingsConfig(name=key, files=dict(files)))

  def _features(self):
    spec: dict[str, Any] = {'prompt_id': np.int64, 'prompt': tfds.features.Text(), 'response': tfds.features.Text()}
    spec.update({a: np.float32 for a in HELPSTEER2_ATTRIBUTES})
    return tfds.features.FeaturesDict(spec)

  def _split_generators(self, dl_manager):
    del dl_manager
    rows = {split: [_helpsteer2_row(r, w) for p in paths for w, r in read_rows(p)]
            for split, paths in self.builder_config.files.items()}
    ids: dict[str, int] = {}
    for split, split_rows in rows.items():
      if not split_rows:
        raise ValueError(f'HelpSteer2Ratings: the files of split {split!r} have no rows.')
      for prompt, _, _ in split_rows:
        ids.setdefault(prompt, len(ids))
    return {split: self._generate_examples(split_rows, ids) for split, split_rows in rows.items()}

  def _generate_examples(self, rows, ids) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, (prompt, response, ratings) in enumerate(rows):
      yield i, {'prompt_id': ids[prompt], 'prompt': prompt, 'response': response, **ratings}
