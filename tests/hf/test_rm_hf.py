"""configs/rm_hf.py as a new user runs it: a Hugging Face folder and preference files in, a
`transformers` reward model out.

A tiny random Llama (`save_pretrained`, with the BPE tokenizer of conftest.py) and JSONL files
written here: `python -m rmjax.main` trains a K=2 ensemble from its backbone for 8 steps,
evaluates it RewardBench-style and exports it. The export is then loaded with
`transformers`: its raw scores equal rmjax's scores of the trained checkpoint with no bias
correction (float32, 1e-5 absolute on scores of magnitude about 1), and the bench accuracy is
recomputed from `transformers`' scores.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch  # the [hf] extra, installed by README's test command and CI
import transformers

from experiments import rm_hf
from rmjax import config as config_lib
from rmjax.data import chat
from rmjax.data.pipeline import encode_prompt_response
from rmjax.models import RewardModel, hf
from rmjax.train import checkpoint

ROOT = pathlib.Path(__file__).parent.parent.parent
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / '.jax_cache'),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
SEQ_LEN, TOL = 48, 1e-5
GOOD, BAD = 'the assistant is helpful, how are you?', 'be brief.'


def _hh(prompt, response):
  return f'\n\nHuman: {prompt}\n\nAssistant: {response}'


def _write_jsonl(path, rows):
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return path


@pytest.fixture(scope='module')
def files(tmp_path_factory, tokenizer_folders):
  """The model folder (weights, tokenizer, template) and the train / test / bench files."""
  root = tmp_path_factory.mktemp('rm_hf')
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=4)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / 'llama')
  for f in tokenizer_folders[0].iterdir():
    shutil.copy(f, root / 'llama' / f.name)
  # chosen is always the long helpful answer: a signal a few steps can pick up.
  pairs = lambda n, tag: [{'chosen': _hh(f'hi {tag}{i}', GOOD if i % 2 else GOOD.upper()),
                           'rejected': _hh(f'hi {tag}{i}', BAD)} for i in range(n)]
  subsets = ['alpacaeval-easy', 'mt-bench-hard', 'donotanswer', 'math-prm', 'hep-go', 'mine']
  bench = [{'prompt': f'hello {i}', 'chosen': GOOD, 'rejected': BAD if i % 3 else 'the assistant',
            'subset': subsets[i % 6]} for i in range(12)]
  return dict(model=root / 'llama', train=_write_jsonl(root / 'train.jsonl', pairs(64, 'a')),
              test=_write_jsonl(root / 'test.jsonl', pairs(16, 'b')),
              bench=_write_jsonl(root / 'bench.jsonl', bench), root=root)


def _overrides(files):
  return {'model_path': files['model'], 'data.train': files['train'], 'data.test': files['test'],
          'bench.path': files['bench'], 'data.seq_len': SEQ_LEN, 'ensemble.members': 2, 'train.steps': 8,
          'train.batch_size': 16, 'train.eval_every': 0, 'train.checkpoint_every': 8, 'train.progress': False,
          'optim.lr': 3e-3, 'optim.warmup_steps': 0, 'eval.batch_size': 16}


@pytest.fixture(scope='module')
def job(files):
  workdir = files['root'] / 'work'
  cmd = [sys.executable, '-m', 'rmjax.main', '--config=configs/rm_hf.py', f'--workdir={workdir}']
  cmd += [f'--config.{k}={v}' for k, v in _overrides(files).items()]
  out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, json.loads((workdir / 'summary.json').read_text())


def _transformers_scores(folder, tokens, mask):
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits[:, 0]


def _encode(tok, prompts, responses):
  enc = [encode_prompt_response(tok, p, r, SEQ_LEN) for p, r in zip(prompts, responses)]
  return np.stack([e[0] for e in enc]), np.stack([e[1] for e in enc])


def test_export_scores_equal_the_trained_model_without_bias_correction(files, job):
  workdir, summary = job
  state, meta = checkpoint.load(workdir / 'rm' / 'checkpoints')
  assert meta['final'] and meta['data_step'] == int(state['step']) == 8
  params = state['params']
  np.testing.assert_array_equal(np.asarray(params['reward_head']['bias']), 0.0)  # exactly, after 8 Adam steps
  pretrained, _ = hf.load(files['model'])
  embed = np.asarray(params['backbone']['embed']['embedding'])
  assert np.abs(embed - pretrained['backbone']['embed']['embedding'][None]).max() > 1e-4  # the backbone trained
  assert summary['export'] == [str(workdir / 'export' / f'member_{k}') for k in range(2)]
  assert summary['test']['eval/accuracy'] == 1.0  # the signal is learned

  tok, _ = chat.load_tokenizer(workdir / 'export' / 'member_0')
  rows = [json.loads(line) for line in files['test'].read_text().splitlines()]
  split = [r[side].rpartition('\n\nAssistant:') for r in rows for side in ('chosen', 'rejected')]
  tokens, mask = _encode(tok, [p + a for p, a, _ in split], [r for _, _, r in split])
  ours = np.asarray(jax.jit(RewardModel.from_dict(meta['model']).apply)(params, tokens, mask))
  for k in range(2):
    folder = workdir / 'export' / f'member_{k}'
    cfg = json.loads((folder / 'config.json').read_text())
    assert 'rmjax_score_bias' not in cfg
    assert cfg['rmjax_normalization'] == {'mean': [meta['normalization']['mean'][k]],
                                          'std': [meta['normalization']['std'][k]]}
    theirs = _transformers_scores(folder, tokens, mask).numpy()
    diff = np.abs(theirs - ours[k]).max()
    print(f'member {k}: max |transformers - rmjax| = {diff:.3g} (score scale {np.abs(ours[k]).max():.3g})')
    assert np.abs(ours[k]).max() > 0.1 and diff < TOL


def test_bench_accuracy_from_transformers_scores(files, job):
  """RewardBench accuracy of the export = that of transformers' normalized, member-averaged scores."""
  workdir, summary = job
  results = json.loads((workdir / 'bench' / 'results.json').read_text())
  assert summary['bench']['accuracy'] == results['accuracy']
  assert set(results['sections']) == {'Chat', 'Chat Hard', 'Safety', 'Reasoning', 'Other'}
  assert (workdir / 'bench' / 'reliability.png').is_file()
  rows = [json.loads(line) for line in files['bench'].read_text().splitlines()]
  tok, _ = chat.load_tokenizer(workdir / 'export' / 'member_0')
  tokens, mask = _encode(tok, [r['prompt'] for r in rows] * 2, [r['chosen'] for r in rows] +
                         [r['rejected'] for r in rows])
  margin = 0.0
  for k in range(2):
    folder = workdir / 'export' / f'member_{k}'
    norm = json.loads((folder / 'config.json').read_text())['rmjax_normalization']
    scores = (_transformers_scores(folder, tokens, mask).numpy() - norm['mean'][0]) / norm['std'][0]
    margin = margin + (scores[:12] - scores[12:]) / 2
  assert results['accuracy'] == pytest.approx(np.mean(margin > 0), abs=1e-12)
  assert results['subsets']['mine']['count'] == 2


@pytest.mark.parametrize('change, match', [
    ({'model_path': ''}, r'config.model_path: is empty; give --config.model_path=PATH'),
    ({'model_path': '/nonexistent'}, r"config.model_path: '/nonexistent' is not an existing folder"),
    ({'data.train': '/nonexistent.jsonl'}, r'config.data.train: .* not an existing file'),
    ({'data.test': ''}, r'config.data.test: is empty'),
    ({'bench.path': '/nonexistent.jsonl'}, r'config.bench.path: .* not an existing file'),
    ({'tokenizer': 'TRAIN'}, r'config.tokenizer: .* not an existing folder'),
    ({'data.seq_len': 4096}, r'config.data.seq_len: 4096 exceeds the model\'s max_len 128'),
    ({'ensemble.head_bias': 'learned'}, r'config.ensemble.head_bias: .* use "zero"'),
    ({'ensemble.head_bias': 'frozen'}, r"config.ensemble.head_bias='frozen': expected one of \('learned', 'zero'\)"),
    ({'data.layout': 'anthropic'}, r"config.data.layout='anthropic'"),
])
def test_config_errors_name_the_field(files, change, match):
  config = config_lib.load_config_file(str(ROOT / 'configs' / 'rm_hf.py'))
  for key, value in (_overrides(files) | change).items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = str(files['train']) if value == 'TRAIN' else str(value) if isinstance(value, pathlib.Path) else value
  with pytest.raises(config_lib.ConfigError, match=match):
    rm_hf.validate(config)


def test_model_folder_errors_name_the_field(files, tmp_path):
  """A folder without weights, and a tokenizer whose pad is its eos, fail in validation."""
  config = config_lib.load_config_file(str(ROOT / 'configs' / 'rm_hf.py'))
  config.data.train, config.data.test, config.data.seq_len = str(files['train']), str(files['test']), SEQ_LEN
  shutil.copy(files['model'] / 'config.json', tmp_path / 'config.json')
  config.model_path = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match='config.model_path: .*no model.safetensors'):
    rm_hf.validate(config)
  shutil.copytree(files['model'], tmp_path / 'm')
  specials = json.loads((tmp_path / 'm' / 'tokenizer_config.json').read_text()) | {'pad_token': '<|im_end|>'}
  (tmp_path / 'm' / 'tokenizer_config.json').write_text(json.dumps(specials))
  config.model_path = str(tmp_path / 'm')
  with pytest.raises(config_lib.ConfigError, match='config.model_path: the tokenizer\'s pad id 4 equals'):
    rm_hf.validate(config)
