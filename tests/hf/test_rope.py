"""Rotary scaling types: tables against a float64 numpy reference, config forms, parity with `transformers`.

The reference is written from the piecewise definitions (Llama 3 report; YaRN, Peng et al.
2023), not from `rope_tables`' clip form. Tables: |cos, sin - reference| < 1e-4 at positions
below 512, where one float32 rounding of an angle is at most 512 * 2^-24 = 3e-5 rad.
Logits (float32, 2 layers, head width 32, 256 positions, so every frequency band is crossed
past the original length 64): 1e-4 absolute, as in test_parity.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the [hf] extra, installed by README's test command and CI
import transformers

from rmjax.models import ModelConfig, hf, lm_logits
from rmjax.models import transformer
from rmjax.models.transformer import rope_tables

HD, THETA, L, S = 32, 10000.0, 64, 4.0  # head width, base, original length, factor
TOL_TABLE, TOL_LOGITS = 1e-4, 1e-4
SCALINGS = {
    'linear': dict(rope_type='linear', factor=S),
    'llama3': dict(rope_type='llama3', factor=S, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=L),
    'yarn': dict(rope_type='yarn', factor=S, original_max_position_embeddings=L),
}


def _config(**rope):
  return ModelConfig(vocab_size=64, width=64, mlp_width=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     rope_theta=THETA, max_len=512, **rope)


def reference_inv_freq(rope_type, *, factor=S, low=1.0, high=4.0, beta_fast=32.0, beta_slow=1.0, truncate=True):
  """(inverse frequencies [HD/2], cos/sin multiplier) in float64, band by band."""
  w = np.array([THETA ** (-2 * i / HD) for i in range(HD // 2)])
  if rope_type == 'default':
    return w, 1.0
  if rope_type == 'linear':
    return w / factor, 1.0
  wavelength = 2 * np.pi / w
  if rope_type == 'llama3':
    out = []
    for wi, li in zip(w, wavelength):
      if li < L / high:  # high frequency: kept
        out.append(wi)
      elif li > L / low:  # low frequency: interpolated by the factor
        out.append(wi / factor)
      else:  # smooth blend of the two
        g = (L / li - low) / (high - low)
        out.append((1 - g) * wi / factor + g * wi)
    return np.array(out), 1.0
  # yarn: dimension d turns L / wavelength_d times over the original context.
  dim_of = lambda r: HD * math.log(L / (2 * math.pi * r)) / (2 * math.log(THETA))
  a, b = dim_of(beta_fast), dim_of(beta_slow)
  if truncate:
    a, b = math.floor(a), math.ceil(b)
  a, b = max(a, 0), min(b, HD - 1)
  out = []
  for i, wi in enumerate(w):
    extrapolate = 1.0 if i <= a else 0.0 if i >= b else 1 - (i - a) / (b - a)
    out.append(extrapolate * wi + (1 - extrapolate) * wi / factor)
  return np.array(out), 0.1 * math.log(factor) + 1


@pytest.mark.parametrize('rope, ref', [
    ({}, {'rope_type': 'default'}),
    ({'rope_type': 'linear', 'rope_factor': S}, {'rope_type': 'linear'}),
    ({'rope_type': 'llama3', 'rope_factor': S, 'rope_original_max_len': L}, {'rope_type': 'llama3'}),
    ({'rope_type': 'llama3', 'rope_factor': 8.0, 'rope_original_max_len': L, 'rope_low_freq_factor': 2.0,
      'rope_high_freq_factor': 8.0}, {'rope_type': 'llama3', 'factor': 8.0, 'low': 2.0, 'high': 8.0}),
    ({'rope_type': 'yarn', 'rope_factor': S, 'rope_original_max_len': L}, {'rope_type': 'yarn'}),
    ({'rope_type': 'yarn', 'rope_factor': S, 'rope_original_max_len': L, 'rope_beta_fast': 8.0,
      'rope_truncate': False}, {'rope_type': 'yarn', 'beta_fast': 8.0, 'truncate': False}),
])
@pytest.mark.parametrize('constants', [True, False], ids=['gathered', 'run time'])
def test_tables_match_numpy_reference(rope, ref, constants, monkeypatch):
  """Both forms of the tables: gathered from the float64 constants of every position below
  max_len, and computed from float32 angles at run time (contexts past `ROPE_TABLE_ENTRIES`)."""
  if not constants:
    monkeypatch.setattr(transformer, 'ROPE_TABLE_ENTRIES', 0)
  inv, scale = reference_inv_freq(**ref)
  positions = np.array([[0, 1, 7, 63, 64, 200, 511]])
  cos, sin = (np.asarray(t)[0, :, 0] for t in rope_tables(jnp.asarray(positions), _config(**rope)))
  angles = positions[0, :, None] * inv
  np.testing.assert_allclose(cos, scale * np.cos(angles), atol=TOL_TABLE, rtol=0)
  np.testing.assert_allclose(sin, scale * np.sin(angles), atol=TOL_TABLE, rtol=0)


def test_reference_bands_are_all_crossed():
  """The chosen sizes put frequencies in each band, so the tests above exercise every branch."""
  w = THETA ** (-2 * np.arange(HD // 2) / HD)
  wavelength = 2 * np.pi / w
  assert (wavelength < L / 4).sum() == 2 and (wavelength > L).sum() == 11  # llama3: kept 2, interpolated 3
  inv, _ = reference_inv_freq('llama3')
  np.testing.assert_allclose(inv[:2], w[:2], rtol=1e-12)
  np.testing.assert_allclose(inv[5:], w[5:] / S, rtol=1e-12)
  assert np.all((inv[2:5] < w[2:5]) & (inv[2:5] > w[2:5] / S))
  # yarn: ramp from a = 0 to b = ceil(4.03) = 5; the attention factor 0.1 ln 4 + 1.
  inv, scale = reference_inv_freq('yarn')
  assert inv[0] == w[0] and np.allclose(inv[5:], w[5:] / S, rtol=1e-12)
  assert scale == pytest.approx(1.1386294361)


def test_default_table_is_the_float64_table_rounded_once():
  """The default path is the plain RoFormer table, cos and sin of positions · theta^(-2i/hd) computed
  in float64 and rounded once to float32 (within 6e-8, half a float32 step at 1); a position past
  max_len gives NaN, not the table's last row."""
  positions = jnp.arange(300)[None]
  cos, sin = rope_tables(positions, _config())
  angles = np.arange(300)[:, None] * THETA ** (-np.arange(0, HD, 2) / HD)
  np.testing.assert_allclose(np.asarray(cos)[0, :, 0], np.cos(angles), atol=6e-8, rtol=0)
  np.testing.assert_allclose(np.asarray(sin)[0, :, 0], np.sin(angles), atol=6e-8, rtol=0)
  cos, sin = rope_tables(jnp.asarray([[511, 512]]), _config())
  assert np.all(np.isfinite(np.asarray(cos)[0, 0])) and np.all(np.isnan(np.asarray(cos)[0, 1]))


LLAMA = dict(model_type='llama', vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def test_config_forms_and_round_trip():
  lin_old = hf.config_from_hf(LLAMA | {'rope_theta': THETA, 'rope_scaling': {'type': 'linear', 'factor': 4}})
  lin_new = hf.config_from_hf(LLAMA | {'rope_parameters': {'rope_theta': THETA, **SCALINGS['linear']}})
  assert lin_old == lin_new and (lin_new.rope_type, lin_new.rope_factor) == ('linear', 4.0)
  l3 = hf.config_from_hf(LLAMA | {'rope_scaling': SCALINGS['llama3']})
  assert (l3.rope_original_max_len, l3.rope_low_freq_factor, l3.rope_high_freq_factor) == (L, 1.0, 4.0)
  # transformers' defaults: a top-level original_max_position_embeddings wins; yarn's factor = max / original,
  # attention factor from mscale / mscale_all_dim, beta_fast / beta_slow 32 / 1.
  yarn = hf.config_from_hf(LLAMA | {'original_max_position_embeddings': 32,
                                    'rope_parameters': {'rope_type': 'yarn', 'factor': None, 'mscale': 2.0,
                                                        'mscale_all_dim': 1.0}})
  assert (yarn.rope_original_max_len, yarn.rope_factor) == (32, 8.0)
  assert yarn.rope_attention_factor == pytest.approx((0.2 * math.log(8) + 1) / (0.1 * math.log(8) + 1))
  assert (yarn.rope_beta_fast, yarn.rope_beta_slow, yarn.rope_truncate) == (32.0, 1.0, True)
  for config in (lin_new, l3, yarn, hf.config_from_hf(LLAMA | {'rope_scaling': SCALINGS['yarn']})):
    assert hf.config_from_hf(hf.config_to_hf(config)) == config
  with pytest.raises(ValueError, match="rope_scaling\\['rope_type'\\]='longrope' is not supported"):
    hf.config_from_hf(LLAMA | {'rope_scaling': {'rope_type': 'longrope', 'short_factor': [1.0], 'long_factor': [2]}})
  with pytest.raises(ValueError, match="no 'low_freq_factor'"):
    hf.config_from_hf(LLAMA | {'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}})
  with pytest.raises(ValueError, match='ModelConfig.rope_type'):
    _config(rope_type='ntk')
  with pytest.raises(ValueError, match='rope_original_max_len'):
    _config(rope_type='yarn', rope_factor=2.0)


_lm_logits = jax.jit(lm_logits, static_argnums=1)


@pytest.mark.parametrize('name', sorted(SCALINGS))
def test_logits_match_transformers(name, tmp_path):
  """A random 2-layer Llama with the scaling, at 256 positions (4x the original length), and its export."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                 initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                                 rope_parameters={'rope_theta': THETA, **SCALINGS[name]})
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    model.model.norm.weight.mul_(4.0)
  model.save_pretrained(tmp_path / 'theirs')
  params, config = hf.load(tmp_path / 'theirs')
  assert config.rope_type == name
  t = 256
  tokens = np.random.default_rng(0).integers(1, 96, (2, t))
  mask = np.ones((2, t), bool)
  mask[1, :40] = False  # left padding: row 1's positions start at 0 after it
  tokens[~mask] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions)).logits.numpy()
  out = np.asarray(_lm_logits(params, config, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)))
  diff = np.abs(out - ref)[mask].max()
  print(f'{name}: max |logit diff| = {diff:.3g} (logit scale {np.abs(ref[mask]).max():.3g})')
  assert np.abs(ref[mask]).max() > 1.0
  assert diff < TOL_LOGITS
  # The scaling changes the logits (so the parity above is not the default table's).
  plain = np.asarray(_lm_logits(params, config.replace(rope_type='default'), jnp.asarray(tokens),
                                jnp.asarray(mask), jnp.asarray(positions)))
  assert np.abs(plain - ref)[mask].max() > 100 * TOL_LOGITS
  # Export writes the scaling back: re-import gives the same config, transformers the same logits.
  hf.save(params, config, tmp_path / 'ours')
  assert hf.load(tmp_path / 'ours')[1] == config
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  with torch.no_grad():
    ref2 = again(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.numpy()
  np.testing.assert_array_equal(ref2, ref)
