"""Next-token training of a policy (`configs/sft.py`): pretraining on a corpus, or supervised
fine-tuning on prompt/response pairs.

The corpus is the built-in synthetic language (`data.source='grammar'`: documents sampled
from `Grammar.random(seed)`) or local files (`data.source='files'`, `data.files` a
comma-separated list of `.jsonl` files with a `text` field or plain-text files, one document
per line), written once as a TFDS dataset under the workdir.
"""
from __future__ import annotations

import pathlib

import jax
import ml_collections
import tensorflow_datasets as tfds

from rmjax import config as config_lib
from rmjax import parallel
from rmjax.data import builders, pipeline
from rmjax.data.synthetic_language import Grammar
from rmjax.data.tokenizer import ByteTokenizer, Tokenizer
from rmjax.train import lm_trainer

SOURCES = ('grammar', 'files')


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.require_choice(config, 'data.source', SOURCES)
  config_lib.require_positive(config, 'data.seq_len', 'data.num_documents', 'train.steps', 'train.batch_size')
  if config.data.source == 'files' and not config.data.files:
    raise config_lib.ConfigError("config.data.files is empty: give comma-separated paths with data.source='files'.")
  parallel.mesh_from_config(config.mesh)


def grammar_corpus(workdir: pathlib.Path, seed: int, num_documents: int) -> builders.TextCorpus:
  """`num_documents` documents of `Grammar.random(seed)` as a prepared TFDS corpus (`train` split)."""
  builder = builders.TextCorpus(data_dir=str(workdir / 'tfds'), key=f'grammar{seed}_n{num_documents}',
                                documents=lambda split: Grammar.random(seed).documents(num_documents, seed=seed),
                                split_sizes={'train': num_documents})
  builder.download_and_prepare()
  return builder


def corpus(config, workdir: pathlib.Path) -> builders.TextCorpus:
  """The prepared training corpus (`train` split) of `config.data`."""
  d = config.data
  if d.source == 'grammar':
    return grammar_corpus(workdir, int(config.seed), int(d.num_documents))
  builder = builders.TextCorpus(data_dir=str(workdir / 'tfds'),
                                files={'train': [p.strip() for p in d.files.split(',') if p.strip()]})
  builder.download_and_prepare()
  return builder


def pretrain(section, workdir: pathlib.Path, source, tok: Tokenizer, mesh, run_config):
  """Train `section.model` on `source` rows (`text` field) with `section.optim` / `section.train`.

  Returns (params, model config); resumes from `workdir/checkpoints`.
  """
  model_cfg = config_lib.model_config(section.model, vocab_size=tok.vocab_size)
  batches = pipeline.SequenceBatches(source, tok, seq_len=int(section.seq_len),
                                     global_batch_size=int(section.train.batch_size), seed=int(run_config.seed),
                                     process_index=jax.process_index(), process_count=jax.process_count())
  params, _ = lm_trainer.train(section, workdir, model_config=model_cfg, batches=batches, mesh=mesh, tokenizer=tok,
                               run_config=run_config)
  return params, model_cfg


def run(config: ml_collections.ConfigDict, workdir: str):
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  section = ml_collections.ConfigDict(dict(model=config.model, optim=config.optim, train=config.train,
                                           seq_len=config.data.seq_len))
  params, model_cfg = pretrain(section, workdir, corpus(config, workdir).as_data_source('train'), ByteTokenizer(),
                               parallel.mesh_from_config(config.mesh), config)
  print(f'trained {model_cfg.num_layers}-layer policy; checkpoints in {workdir / "checkpoints"}')
  return params
