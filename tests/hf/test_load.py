"""`rmjax.models.hf` without transformers: config forms, errors, the safetensors files, memory."""
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import ModelConfig, hf, transformer

LLAMA = dict(model_type='llama', vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_rope_config_forms():
  new = hf.config_from_hf(LLAMA | {'rope_parameters': {'rope_type': 'default', 'rope_theta': 5e5}})
  old = hf.config_from_hf(LLAMA | {'rope_theta': 5e5, 'rope_scaling': None})
  assert new == old and new.rope_theta == 5e5 and new.max_len == 256
  assert hf.config_from_hf(LLAMA).rope_theta == 10000.0
  per_layer = {'full_attention': {'rope_type': 'default', 'rope_theta': 7.0}}
  assert hf.config_from_hf(LLAMA | {'rope_parameters': per_layer}).rope_theta == 7.0
  # 'dynamic' NTK equals the base rotary up to the original length, so max_len is capped there.
  dyn_old = hf.config_from_hf(LLAMA | {'rope_theta': 3.0, 'rope_scaling': {'type': 'dynamic', 'factor': 2.0,
                                                                           'original_max_position_embeddings': 128}})
  dyn_new = hf.config_from_hf(LLAMA | {'rope_parameters': {'rope_type': 'dynamic', 'rope_theta': 3.0, 'factor': 2.0}})
  assert (dyn_old.max_len, dyn_old.rope_theta, dyn_new.max_len) == (128, 3.0, 256)
  # linear, llama3 and yarn are read into ModelConfig's rope fields (test_rope.py); others name the field.
  for scaling in ({'type': 'longrope', 'factor': 2.0}, {'rope_type': 'su'}):
    with pytest.raises(ValueError, match="rope_scaling\\['rope_type'\\]"):
      hf.config_from_hf(LLAMA | {'rope_scaling': scaling})
  with pytest.raises(ValueError, match='partial_rotary_factor'):
    hf.config_from_hf(LLAMA | {'partial_rotary_factor': 0.5})


def test_config_fields_and_round_trip():
  cfg = hf.config_from_hf(LLAMA | {'head_dim': 16, 'tie_word_embeddings': True, 'rms_norm_eps': 1e-5},
                          dtype='bfloat16')
  assert (cfg.head_width, cfg.head_dim, cfg.tie_embeddings, cfg.norm_eps) == (16, 16, True, 1e-5)
  assert (cfg.dtype, cfg.param_dtype) == ('bfloat16', 'bfloat16')
  assert hf.config_from_hf(LLAMA | {'model_type': 'qwen2'}).attn_bias
  sliding = hf.config_from_hf(LLAMA | {'model_type': 'qwen2', 'use_sliding_window': True, 'sliding_window': 64})
  assert sliding.max_len == 64
  for config in (ModelConfig(vocab_size=64, width=32, mlp_width=48, num_layers=1, num_heads=4, num_kv_heads=1,
                             attn_bias=True, max_len=77, rope_theta=1e6, norm_eps=1e-5),
                 ModelConfig(vocab_size=64, width=32, mlp_width=48, num_layers=1, num_heads=4, num_kv_heads=4,
                             family='gpt2', attn_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5)):
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


@pytest.mark.parametrize('change, match', [
    ({'model_type': 'mistral'}, 'model_type'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
])
def test_unsupported_configs(change, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(LLAMA | change)
  with pytest.raises(ValueError, match='dtype'):
    hf.config_from_hf(LLAMA, dtype='int8')


def _random_params(config, head='lm', seed=0):
  rng = np.random.default_rng(seed)
  shapes = hf.expected_shapes(config, head, 1)
  params = {}
  for path, shape in shapes.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = rng.standard_normal(shape, np.float32)
  return params


SMALL = ModelConfig(vocab_size=64, width=32, mlp_width=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    attn_bias=True, mlp_bias=True)


def test_safetensors_layout_and_errors(tmp_path):
  params = _random_params(SMALL)
  hf.save(params, SMALL, tmp_path / 'm')
  tensors = hf.read_header(tmp_path / 'm' / hf.WEIGHTS_FILE)
  # Llama with both biases: qkv split into q/k/v (transposed) plus a zero o_proj bias.
  q = tensors['model.layers.0.self_attn.q_proj.weight']
  assert q.shape == (32, 32) and q.dtype == np.float32
  assert tensors['model.layers.1.self_attn.o_proj.bias'].shape == (32,)
  cfg = json.loads((tmp_path / 'm' / 'config.json').read_text())
  assert (cfg['model_type'], cfg['attention_bias'], cfg['architectures']) == ('llama', True, ['LlamaForCausalLM'])
  with pytest.raises(ValueError, match='overwrite=True'):
    hf.save(params, SMALL, tmp_path / 'm')
  hf.save(params, SMALL, tmp_path / 'm', overwrite=True)

  # A non-zero o_proj bias cannot be represented.
  good = (tmp_path / 'm' / hf.WEIGHTS_FILE).read_bytes()
  raw = bytearray(good)
  o = tensors['model.layers.0.self_attn.o_proj.bias']
  raw[o.start:o.end] = np.ones(32, np.float32).tobytes()
  (tmp_path / 'm' / hf.WEIGHTS_FILE).write_bytes(bytes(raw))
  with pytest.raises(ValueError, match='o_proj.bias is not zero'):
    hf.load(tmp_path / 'm')
  # A config that does not fit the tensors names the tensor.
  (tmp_path / 'm' / hf.WEIGHTS_FILE).write_bytes(good)
  (tmp_path / 'm' / 'config.json').write_text(json.dumps(cfg | {'intermediate_size': 40}))
  with pytest.raises(ValueError, match="gate_proj.weight' has shape"):
    hf.load(tmp_path / 'm')
  # Truncated file, no weights, pickle-only folder.
  (tmp_path / 'm' / hf.WEIGHTS_FILE).write_bytes(bytes(raw[:100]))
  with pytest.raises(ValueError, match='header length|byte range'):
    hf.load(tmp_path / 'm')
  (tmp_path / 'm' / hf.WEIGHTS_FILE).unlink()
  (tmp_path / 'm' / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ValueError, match='pickle'):
    hf.load(tmp_path / 'm')


def test_save_load_exact_in_bfloat16(tmp_path):
  bf = jnp.bfloat16
  params = jax.tree.map(lambda x: x.astype(bf), _random_params(SMALL))
  hf.save(params, SMALL.replace(param_dtype='bfloat16'), tmp_path)
  assert hf.read_header(tmp_path / hf.WEIGHTS_FILE)['model.norm.weight'].dtype == bf
  loaded, config = hf.load(tmp_path, dtype='bfloat16')
  assert config.param_dtype == 'bfloat16'
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  for (pa, a), (pb, b) in zip(flat(params), flat(loaded)):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a), b)
  as32, _ = hf.load(tmp_path)
  np.testing.assert_array_equal(as32['backbone']['embed']['embedding'],
                                np.asarray(params['backbone']['embed']['embedding']).astype(np.float32))


def test_scanned_params_save_per_layer(tmp_path):
  # A scan_layers model writes the same folder as its per-layer twin; load gives the per-layer layout.
  params = _random_params(SMALL)
  hf.save(transformer.stack_layers(params, SMALL.num_layers), SMALL.replace(scan_layers=True), tmp_path / 's')
  hf.save(params, SMALL, tmp_path / 'p')
  assert (tmp_path / 's' / hf.WEIGHTS_FILE).read_bytes() == (tmp_path / 'p' / hf.WEIGHTS_FILE).read_bytes()
  loaded, config = hf.load(tmp_path / 's')
  assert not config.scan_layers and 'layers_1' in loaded['backbone']


_MEMORY_SCRIPT = textwrap.dedent('''
  import gc, json, sys
  from rmjax.models import hf

  def status(field):
    for line in open('/proc/self/status'):
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024

  folder = sys.argv[1]
  hf.expected_shapes(*hf.inspect(folder)[:1], 'lm', 0)  # jax's first trace, outside the measurement
  gc.collect()
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # resets the peak resident size (VmHWM) to the current one
  before = status('VmRSS')
  params, _ = hf.load(folder)
  peak = status('VmHWM')
  import jax
  leaves = jax.tree.leaves(params)
  print(json.dumps({'growth': peak - before, 'output': sum(x.nbytes for x in leaves),
                    'torch': 'torch' in sys.modules}))
''')


def test_load_streams_tensor_by_tensor(tmp_path):
  """Peak resident memory grows by less than the output plus 1.5x the largest tensor."""
  config = ModelConfig(vocab_size=32768, width=256, mlp_width=512, num_layers=2, num_heads=4, num_kv_heads=2)
  hf.save(_random_params(config), config, tmp_path)
  largest = max(t.end - t.start for t in hf.read_header(tmp_path / hf.WEIGHTS_FILE).values())
  out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert not result['torch']
  print(f'growth {result["growth"] / 2**20:.1f} MiB, output {result["output"] / 2**20:.1f} MiB, '
        f'largest tensor {largest / 2**20:.1f} MiB')
  assert result['output'] > 2 * largest  # the model is not one tensor
  assert result['growth'] < result['output'] + 1.5 * largest
