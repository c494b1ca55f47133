"""The reward-model job on a local Hugging Face backbone and local preference files (`configs/rm_hf.py`).

Stages, under the workdir (a rerun reuses the data, resumes or skips the training, and
rewrites the export and the evaluation):

1. `data/`: the preference files as a TFDS dataset (`rmjax.data.hf_datasets.PreferenceFiles`,
   keyed by the files' contents and the layout settings).
2. `rm/`: the reward model (`ensemble.members` members, each starting from the backbone of
   `model_path` with a new head) trained on the train split by `rmjax.train.rm_trainer`;
   each member is normalized by the mean and std of its raw scores over the test split's
   responses and evaluated on its pairs (`rm/checkpoints`, `rm/metrics.jsonl`).
3. `export/`: sequence-classification folders for `transformers` (`rmjax.models.hf.save`: one
   per member, `export/member_{k}`, with the tokenizer, the chat template and the member's
   normalization). `ensemble.head_bias='zero'` keeps the head bias exactly 0, so
   `transformers`' raw score of an exported member equals rmjax's.
4. `bench/` (when `bench.path` is set): RewardBench-style evaluation of the export
   (`rmjax.eval.reward_bench`: accuracy per subset and section, ECE, ensemble disagreement).

Writes `summary.json`: the test-split metrics, the bench accuracy and sections, the export folders.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds

from rmjax import config as config_lib
from rmjax import parallel
from rmjax.data import chat, hf_datasets
from rmjax.data.pipeline import PairBatches
from rmjax.data.tokenizer import HFTokenizer
from rmjax.eval import reward_bench
from rmjax.models import ModelConfig, hf
from rmjax.models.reward_model import RewardModel
from rmjax.train import rm_trainer

EVAL_CONFIG = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'rm_eval.py'


def _error(field: str, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'config.{field}: {message}')


def _existing(config, field: str, kind: str) -> pathlib.Path:
  """The path in `config.<field>`, which must be a non-empty path to an existing `kind` ('file' / 'folder')."""
  value = config_lib.get(config, field)
  if not value:
    raise _error(field, f'is empty; give --config.{field}=PATH.')
  path = pathlib.Path(value)
  if not (path.is_file() if kind == 'file' else path.is_dir()):
    raise _error(field, f'{value!r} is not an existing {kind}.')
  return path


def inputs(config) -> tuple[ModelConfig, HFTokenizer, chat.ChatTemplate | None]:
  """(ModelConfig, tokenizer, chat template) of the config's folders; reads no weights."""
  model_path = _existing(config, 'model_path', 'folder')
  config_lib.require_choice(config, 'dtype', hf.LOAD_DTYPES)
  try:
    model_config, _ = hf.inspect(model_path, dtype=config.dtype)
  except ValueError as e:
    raise _error('model_path', str(e)) from e
  if config.data.seq_len > model_config.max_len:
    raise _error('data.seq_len', f'{config.data.seq_len} exceeds the model\'s max_len {model_config.max_len} '
                                 '(max_position_embeddings, or the sliding window / dynamic-rope cap).')
  field = 'tokenizer' if config.tokenizer else 'model_path'
  folder = _existing(config, 'tokenizer', 'folder') if config.tokenizer else model_path
  try:
    tokenizer, template = chat.load_tokenizer(folder)
  except ValueError as e:
    raise _error(field, str(e)) from e
  if tokenizer.pad_id in (tokenizer.bos_id, tokenizer.eos_id):
    raise _error(field, f'the tokenizer\'s pad id {tokenizer.pad_id} equals its bos or eos id ({tokenizer.bos_id}, '
                        f'{tokenizer.eos_id}); transformers scores the rightmost token that is not the pad, so the '
                        'export needs a pad token of its own (tokenizer_config.json "pad_token").')
  if tokenizer.vocab_size > model_config.vocab_size:
    raise _error(field, f'the tokenizer has {tokenizer.vocab_size} ids, the model {model_config.vocab_size}.')
  for name, enabled in (('data.chat_template', config.data.chat_template),
                        ('bench.chat_template', config.bench.chat_template)):
    if enabled and template is None:
      raise _error(name, f'is True, but the tokenizer folder {str(folder)!r} has no chat template.')
  return model_config, tokenizer, template


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise a `ConfigError` naming the field to fix, before anything compiles or is read in bulk."""
  C = config_lib
  for field in ('data.train', 'data.test'):
    _existing(config, field, 'file')
  if config.bench.path:
    _existing(config, 'bench.path', 'file')
  C.require_choice(config, 'data.layout', hf_datasets.LAYOUTS)
  C.require_choice(config, 'data.attribute', hf_datasets.HELPSTEER2_ATTRIBUTES)
  C.require_positive(config, 'data.seq_len', 'bench.num_bins')
  rm_trainer.validate(config)
  if config.ensemble.head_bias != 'zero':
    raise _error('ensemble.head_bias', f'{config.ensemble.head_bias!r}: the export is a transformers '
                                       'classification head, which has no bias; use "zero".')
  inputs(config)
  parallel.mesh_from_config(config.mesh)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_config, tokenizer, template = inputs(config)
  mesh = parallel.mesh_from_config(config.mesh)
  d = config.data
  data = hf_datasets.PreferenceFiles(
      data_dir=workdir / 'data', files={'train': [d.train], 'test': [d.test]}, layout=d.layout,
      fields=d.fields.to_dict(), attribute=d.attribute, chat_template=template if d.chat_template else None)
  data.download_and_prepare()

  params, _ = hf.load(config.model_path, dtype=config.dtype)
  share = dict(process_index=jax.process_index(), process_count=jax.process_count())
  seed, seq_len = int(config.seed), int(d.seq_len)
  train_batches = PairBatches(data.as_data_source('train'), tokenizer, seq_len=seq_len, seed=seed,
                              global_batch_size=int(config.train.batch_size), **share)
  test_batches = PairBatches(data.as_data_source('test'), tokenizer, seq_len=seq_len, seed=seed, shuffle=False,
                             global_batch_size=int(config.eval.batch_size), drop_remainder=False, **share)
  rm_params, meta = rm_trainer.train(
      config, workdir / 'rm', model_config=model_config, train_batches=train_batches, eval_batches=test_batches,
      reference_batches=test_batches, mesh=mesh, tokenizer=tokenizer, init_backbone=params['backbone'])
  del params

  rm = RewardModel(model_config, num_members=int(config.ensemble.members), kind=config.ensemble.kind)
  folders = hf.save(jax.device_get(rm_params), rm, workdir / 'export', tokenizer=tokenizer, chat_template=template,
                    normalization=meta['normalization'], overwrite=True)
  summary: dict[str, Any] = {'test': meta['eval'], 'export': [str(f) for f in folders]}
  if config.bench.path:
    bench = config_lib.load_config_file(str(EVAL_CONFIG))
    bench.model.update(source='hf', path=str(workdir / 'export'), dtype=config.dtype)
    bench.data.update(path=config.bench.path, chat_template=config.bench.chat_template)
    bench.eval.update(batch_size=int(config.eval.batch_size), seq_len=seq_len, aggregate=config.eval.aggregate,
                      num_bins=int(config.bench.num_bins))
    results = reward_bench.run(bench, str(workdir / 'bench'))
    summary['bench'] = {'accuracy': results['accuracy'], 'sections': results['sections'], 'ece': results['ece']}
  (workdir / 'summary.json').write_text(json.dumps(summary, indent=2, sort_keys=True))
  print(json.dumps(summary, indent=2, sort_keys=True))
  return summary
