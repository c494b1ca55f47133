"""Parity with `transformers` (the `[hf]` extra): import, greedy decoding, export, reward models.

Each family is a small random `transformers` model (2 layers, width 32, 4 heads, 2 KV heads
for Llama / Qwen2) made here and saved with `save_pretrained`. Its weights are drawn with
std 0.1 and the final norm scaled by 4, so logits are O(1)–O(10) and greedy decoding has
clear margins. Tolerances (float32): logits and scores 1e-4 absolute; exports are exact.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the [hf] extra, installed by README's test command and CI
import transformers

from rmjax.models import hf, lm_logits, sample

V, B, T = 96, 3, 10
TOL = 1e-4
_lm_logits = jax.jit(lm_logits, static_argnums=1)


def _hf_config(family: str, **extra):
  common = dict(vocab_size=V, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=None, **extra)
  llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, **common)
  if family == 'llama':
    return transformers.LlamaConfig(rope_parameters={'rope_type': 'default', 'rope_theta': 5e5}, **llama_like)
  if family == 'qwen2':
    return transformers.Qwen2Config(rope_parameters={'rope_type': 'default', 'rope_theta': 1e6},
                                    tie_word_embeddings=True, **llama_like)
  return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, **common)


def _final_norm(model):
  return model.transformer.ln_f if hasattr(model, 'transformer') else model.model.norm


def _to_old_rope_form(folder):
  """Rewrites config.json into the older form: top-level rope_theta, rope_scaling null."""
  path = folder / 'config.json'
  cfg = json.loads(path.read_text())
  cfg['rope_theta'] = cfg.pop('rope_parameters')['rope_theta']
  cfg['rope_scaling'] = None
  path.write_text(json.dumps(cfg))


@pytest.fixture(scope='module', params=['llama', 'qwen2', 'gpt2'])
def family(request, tmp_path_factory):
  """(name, folder, transformers model, rmjax params, ModelConfig); llama's config.json is in the older rope form."""
  name = request.param
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(name)).eval()
  with torch.no_grad():
    _final_norm(model).weight.mul_(4.0)
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder)
  if name == 'llama':
    _to_old_rope_form(folder)
  params, config = hf.load(folder)
  return name, folder, model, params, config


def _left_padded_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (B, T))
  mask = np.ones((B, T), bool)
  mask[0, :4] = False
  mask[1, :1] = False
  tokens[~mask] = 0
  return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _hf_logits(model, tokens, mask, positions=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=None if positions is None else torch.tensor(positions))
  return out.logits.numpy()


def test_config_read(family):
  name, _, _, params, config = family
  assert config.family == ('gpt2' if name == 'gpt2' else 'llama')
  assert config.rope_theta == {'llama': 5e5, 'qwen2': 1e6, 'gpt2': 10000.0}[name]
  assert config.num_kv_heads == (4 if name == 'gpt2' else 2)
  assert config.tie_embeddings == (name != 'llama')
  assert ('lm_head' in params) == (name == 'llama')
  assert config.attn_bias == (name != 'llama')
  assert isinstance(params['backbone']['embed']['embedding'], np.ndarray)


def test_logits_match_on_left_padded_batch(family):
  name, _, model, params, config = family
  tokens, mask, positions = _left_padded_batch()
  ref = _hf_logits(model, tokens, mask, positions)
  out = np.asarray(_lm_logits(params, config, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)))
  diff = np.abs(out - ref)[mask].max()
  print(f'{name}: max |logit diff| = {diff:.3g} (logit scale {np.abs(ref[mask]).max():.3g})')
  assert np.abs(ref[mask]).max() > 1.0  # the comparison is not between near-zero logits
  assert diff < TOL


def test_greedy_matches_generate(family):
  name, _, model, params, config = family
  tokens, mask, _ = _left_padded_batch()
  n = 8
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                         do_sample=False, max_new_tokens=n, pad_token_id=0).numpy()[:, T:]
  out = sample(params, config, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), max_new_tokens=n,
               temperature=0.0)
  # Near-ties would let float rounding pick either token: check every step has a clear margin.
  full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
  full_mask = np.concatenate([mask, np.ones((B, n), bool)], axis=1)
  logits = np.asarray(_lm_logits(params, config, jnp.asarray(full), jnp.asarray(full_mask)))[:, T - 1:-1]
  top2 = np.sort(logits, axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 100 * TOL, name
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_export_reimport_exact_and_transformers_loads_it(family, tmp_path):
  name, _, model, params, config = family
  out = tmp_path / 'export'
  hf.save(params, config, out)
  again, config2 = hf.load(out)
  assert config2 == config
  a, b = _flat(params), _flat(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  tokens, mask, positions = _left_padded_batch()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask, positions),
                                _hf_logits(model, tokens, mask, positions))


def test_bfloat16_load_is_the_rounded_float32(family):
  _, folder, _, params, _ = family
  bf, config = hf.load(folder, dtype='bfloat16')
  assert config.param_dtype == config.dtype == 'bfloat16'
  a, b = _flat(params), _flat(bf)
  for key in a:
    assert b[key].dtype == jnp.bfloat16
    np.testing.assert_array_equal(b[key], a[key].astype(jnp.bfloat16), err_msg=key)


def test_sharded_folders(family, tmp_path):
  _, _, model, params, config = family
  theirs = tmp_path / 'theirs'
  model.save_pretrained(theirs, max_shard_size='20KB')
  assert (theirs / hf.INDEX_FILE).is_file() and len(list(theirs.glob('*.safetensors'))) > 1
  loaded, _ = hf.load(theirs)
  ours = tmp_path / 'ours'
  hf.save(params, config, ours, max_shard_bytes=20_000)
  assert len(list(ours.glob('*.safetensors'))) > 1
  for tree in (loaded, hf.load(ours)[0]):
    a, b = _flat(params), _flat(tree)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
  tokens, mask, positions = _left_padded_batch()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask, positions),
                                _hf_logits(model, tokens, mask, positions))


def _right_padded_batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, V, (B, T))
  lengths = np.array([T, 6, 3])
  mask = np.arange(T)[None] < lengths[:, None]
  return np.where(mask, tokens, 0), mask


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_sequence_classification_import(name, tmp_path):
  torch.manual_seed(1)
  model = transformers.AutoModelForSequenceClassification.from_config(_hf_config(name, num_labels=1)).eval()
  model.save_pretrained(tmp_path)
  loaded = hf.load_reward_model(tmp_path)
  assert loaded.model.kind == 'full' and loaded.model.num_members == 1 and loaded.normalization is None
  tokens, mask = _right_padded_batch()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  scores = np.asarray(jax.jit(loaded.model.apply)(loaded.params, jnp.asarray(tokens), jnp.asarray(mask)))
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(scores[0], ref[:, 0], atol=TOL, rtol=0)


def test_reward_ensemble_export(family, tmp_path):
  """A K=2 ensemble from the pretrained backbone: one folder per member, raw scores and stats kept.

  With a zero head bias transformers' raw score is rmjax's; a non-zero bias is refused unless
  kept as rmjax_score_bias, which transformers' score then lacks.
  """
  name, _, _, params, config = family
  rm, rm_params = hf.reward_model_from_backbone(jax.random.key(3), params, config, num_members=2)
  stats = {'mean': [0.25, -1.0], 'std': [2.0, 0.5]}
  tokens, mask = _right_padded_batch()
  hf_scores = lambda folder: _hf_scores(transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                                        tokens, mask)
  folders = hf.save(rm_params, rm, tmp_path / 'zero', pad_token_id=0, normalization=stats)
  assert [f.name for f in folders] == ['member_0', 'member_1']
  ours = np.asarray(jax.jit(rm.apply)(rm_params, jnp.asarray(tokens), jnp.asarray(mask)))
  for k, folder in enumerate(folders):
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['rmjax_normalization'] == {'mean': [stats['mean'][k]], 'std': [stats['std'][k]]}
    assert 'rmjax_score_bias' not in cfg
    np.testing.assert_allclose(hf_scores(folder), ours[k], atol=TOL, rtol=0)

  rm_params['reward_head']['bias'] = np.array([[0.0], [0.5]], np.float32)
  with pytest.raises(ValueError, match='head_bias="zero".*keep_score_bias=True'):
    hf.save(rm_params, rm, tmp_path / 'biased', pad_token_id=0)
  folders = hf.save(rm_params, rm, tmp_path / 'biased', pad_token_id=0, normalization=stats, keep_score_bias=True)
  ours = np.asarray(jax.jit(rm.apply)(rm_params, jnp.asarray(tokens), jnp.asarray(mask)))
  for k, folder in enumerate(folders):
    bias = json.loads((folder / 'config.json').read_text())['rmjax_score_bias']
    assert bias == [[0.0], [0.5]][k]
    np.testing.assert_allclose(hf_scores(folder) + bias[0], ours[k], atol=TOL, rtol=0)
  loaded = hf.load_reward_model(tmp_path / 'biased')
  assert loaded.model == rm
  a, b = _flat(rm_params), _flat(loaded.params)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(loaded.normalization[0], np.float32(stats['mean']))
  np.testing.assert_array_equal(loaded.normalization[1], np.float32(stats['std']))


def _hf_scores(model, tokens, mask):
  """transformers' raw scores `[B]` of a one-label sequence-classification model."""
  with torch.no_grad():
    out = model.eval()(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits
  return out.numpy()[:, 0]
