"""Hugging Face model folders <-> rmjax parameters, for the Llama, Qwen2 and GPT-2 families.

A folder is `config.json` plus `model.safetensors`, or shards named by
`model.safetensors.index.json` (its `weight_map`). Reading needs numpy only: the
safetensors header is parsed here and each tensor is read from its byte range straight
into a numpy buffer, one tensor at a time, so loading holds the output plus about one
input tensor (no memory map whose pages would stay resident, no pickle, no torch).

The rmjax layout (`rmjax.models.transformer`) makes the mapping fixed:

  Llama / Qwen2 (`model.` prefix)          rmjax `backbone/`
    embed_tokens.weight [V, D]               embed/embedding [V, D]
    layers.i.input_layernorm.weight          layers_i/attn_norm/scale
    self_attn.{q,k,v}_proj.weight [o, D]     layers_i/attn/qkv/kernel = concat(q.T, k.T, v.T)
    self_attn.{q,k,v}_proj.bias (Qwen2)      layers_i/attn/qkv/bias = concat(q, k, v)
    self_attn.o_proj.weight [D, H hd]        layers_i/attn/out/kernel = o.T
    post_attention_layernorm.weight          layers_i/mlp_norm/scale
    mlp.{gate,up}_proj.weight [F, D]         layers_i/mlp/gate_up/kernel = concat(gate.T, up.T)
    mlp.down_proj.weight [D, F]              layers_i/mlp/down/kernel = down.T
    norm.weight                              final_norm/scale
  GPT-2 (`transformer.` prefix; Conv1D weights are already [in, out])
    wte / wpe                                embed/embedding, pos_embed/embedding
    h.i.ln_1, ln_2, ln_f (weight, bias)      attn_norm, mlp_norm, final_norm (scale, bias)
    h.i.attn.c_attn, attn.c_proj             attn/qkv, attn/out (kernel, bias)
    h.i.mlp.c_fc, mlp.c_proj                 mlp/fc, mlp/down (kernel, bias)
  heads
    lm_head.weight [V, D]                    lm_head/kernel = lm_head.T (absent when tied)
    score.weight [K, D]                      reward_head/kernel = score.T, bias from config.json

A sequence-classification head in `transformers` has no bias, so `save` exports a reward model
whose head bias is exactly 0 (train it with `ensemble.head_bias='zero'`, `rm_trainer`) and
refuses any other unless `keep_score_bias=True`, which stores the bias in `config.json` as
`rmjax_score_bias` (read back by `load`; `transformers`' raw score is then rmjax's minus it).
The member's normalization statistics are kept as `rmjax_normalization` (`{'mean', 'std'}`).
`transformers` scores a row at its rightmost token that is not `pad_token_id`, rmjax at the
last token of the mask: they agree when the pad id never occurs as a real token.

Rotary settings are read from the current `rope_parameters` and from the older
`rope_theta` + `rope_scaling` forms into `ModelConfig`'s rope fields: types 'default',
'linear', 'llama3' and 'yarn' (formulas in `ModelConfig`), and 'dynamic', which equals
'default' up to `original_max_position_embeddings`, to which `max_len` is then capped.
'longrope' and other types raise; `config_to_hf` writes the fields back as `rope_parameters`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple

import jax
import ml_dtypes
import numpy as np

from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import RewardModel
from rmjax.models.transformer import init_lm, unstack_layers

Params = dict[str, Any]
PathLike = str | pathlib.Path

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
MEMBER_PREFIX = 'member_'
LOAD_DTYPES = ('float32', 'bfloat16')

_ST_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LLAMA_TYPES = ('llama', 'qwen2')
_GPT2_ACTS = ('gelu_new', 'gelu_pytorch_tanh')


# --------------------------------------------------------------------------- safetensors


class TensorInfo(NamedTuple):
  """Where a tensor lies: `file`, byte range `[start, end)` from the file's start, dtype, shape."""
  file: pathlib.Path
  start: int
  end: int
  dtype: np.dtype
  shape: tuple[int, ...]


def read_header(path: PathLike) -> dict[str, TensorInfo]:
  """The tensors of one `.safetensors` file: 8-byte little-endian header length, JSON header, data."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with path.open('rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f'{path}: not a safetensors file (shorter than its 8-byte header length).')
    n = int.from_bytes(raw, 'little')
    if n > size - 8:
      raise ValueError(f'{path}: header length {n} exceeds the file size {size}; the file is truncated or not '
                       'safetensors.')
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: the safetensors header is not JSON ({e}).') from e
  out = {}
  for name, meta in header.items():
    if name == '__metadata__':
      continue
    if meta['dtype'] not in _ST_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has dtype {meta["dtype"]}; supported: {sorted(_ST_DTYPES)}.')
    dtype = _ST_DTYPES[meta['dtype']]
    shape = tuple(int(d) for d in meta['shape'])
    start, end = (8 + n + int(o) for o in meta['data_offsets'])
    if end - start != math.prod(shape) * dtype.itemsize or end > size:
      raise ValueError(f'{path}: tensor {name!r} of shape {shape} {meta["dtype"]} has a byte range '
                       f'[{start}, {end}) that does not fit its size or the file ({size} bytes).')
    out[name] = TensorInfo(path, start, end, dtype, shape)
  return out


def folder_tensors(folder: PathLike) -> dict[str, TensorInfo]:
  """All tensors of a model folder: `model.safetensors`, or the shards its index file names."""
  folder = pathlib.Path(folder)
  index = folder / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())['weight_map']
    out: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
      if not (folder / file).is_file():
        raise ValueError(f'{index} names the shard {file}, which is not in {folder}.')
      out.update(read_header(folder / file))
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ValueError(f'{index}: tensors {missing[:5]} are listed but not found in their shards.')
    return out
  if (folder / WEIGHTS_FILE).is_file():
    return read_header(folder / WEIGHTS_FILE)
  found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  raise ValueError(f'{folder}: no {WEIGHTS_FILE} and no {INDEX_FILE} (found {found}); only safetensors '
                   'weights are read (PyTorch .bin files need pickle).')


class _Reader:
  """Reads tensors by name from open shard files, each into a fresh numpy buffer."""

  def __init__(self, tensors: Mapping[str, TensorInfo]):
    self.tensors = tensors
    self._files: dict[pathlib.Path, BinaryIO] = {}

  def __enter__(self) -> '_Reader':
    return self

  def __exit__(self, *exc) -> None:
    for f in self._files.values():
      f.close()

  def read(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f'tensor {name!r} is missing from the model folder.')
    info = self.tensors[name]
    f = self._files.get(info.file)
    if f is None:
      f = self._files[info.file] = info.file.open('rb')
    out = np.empty(info.shape, info.dtype)
    f.seek(info.start)
    if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != info.end - info.start:
      raise ValueError(f'{info.file}: tensor {name!r} is truncated.')
    return out


def _write_safetensors(path: pathlib.Path, tensors: Sequence[tuple[str, Any]]) -> None:
  """Writes `(name, (shape, dtype, make))` tensors one by one, `make()` giving the array (header first, from shapes)."""
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, (shape, dtype, _) in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _ST_NAMES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)
  with path.open('wb') as f:
    f.write(len(raw).to_bytes(8, 'little'))
    f.write(raw)
    for _, (shape, dtype, make) in tensors:
      array = np.ascontiguousarray(make(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f'{path}: internal shape mismatch {array.shape} != {shape}.')
      f.write(memoryview(array.reshape(-1).view(np.uint8)))


# --------------------------------------------------------------------------- configs


class HFInfo(NamedTuple):
  """What a folder holds besides the shapes: `model_type`, `head` ('lm', 'score' or None),
  `num_labels`, the tensor-name `prefix`, and config.json itself (`raw`)."""
  model_type: str
  head: str | None
  num_labels: int
  prefix: str
  raw: dict[str, Any]


def _rope(cfg: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
  """(`ModelConfig` rope fields, max_len cap or None) from `rope_parameters` or `rope_theta` + `rope_scaling`.

  Defaults as `transformers` reads them: `original_max_position_embeddings` from the top level
  of config.json, else the rope dict, else `max_position_embeddings`; YaRN's `factor` defaults
  to max / original length, its attention factor to mscale / mscale_all_dim when both are
  given (else `ModelConfig`'s 0.1 ln(factor) + 1), `beta_fast` / `beta_slow` to 32 / 1.
  """
  field = 'rope_parameters' if cfg.get('rope_parameters') else 'rope_scaling'
  params = cfg.get(field) or {}
  if params and all(isinstance(v, Mapping) for v in params.values()):  # one entry per layer type
    distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
    if len(distinct) > 1:
      raise ValueError(f'{where}: rope_parameters differ between layer types {sorted(params)}; rmjax has one '
                       'rotary table for all layers.')
    params = next(iter(params.values()))
  fields: dict[str, Any] = {'rope_theta': float(params.get('rope_theta', cfg.get('rope_theta', 10000.0)))}
  rope_type = params.get('rope_type', params.get('type', 'default'))
  partial = params.get('partial_rotary_factor', cfg.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise ValueError(f'{where}: partial_rotary_factor={partial}; rmjax rotates the whole head (1.0).')
  max_len = int(cfg.get('max_position_embeddings', 2048))
  original = int(cfg.get('original_max_position_embeddings') or params.get('original_max_position_embeddings')
                 or max_len)
  if rope_type == 'default':
    return fields, None
  if rope_type == 'dynamic':
    return fields, int(params.get('original_max_position_embeddings', max_len))

  def need(key: str) -> float:
    if params.get(key) is None:
      raise ValueError(f'{where}: {field} of rope type {rope_type!r} has no {key!r}.')
    return float(params[key])

  if rope_type == 'linear':
    return fields | dict(rope_type='linear', rope_factor=need('factor')), None
  if rope_type == 'llama3':
    return fields | dict(rope_type='llama3', rope_factor=need('factor'), rope_original_max_len=original,
                         rope_low_freq_factor=need('low_freq_factor'),
                         rope_high_freq_factor=need('high_freq_factor')), None
  if rope_type == 'yarn':
    factor = float(params['factor']) if params.get('factor') is not None else max_len / original
    attention = params.get('attention_factor')
    mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
    if attention is None and mscale and mscale_all_dim and factor > 1:
      attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all_dim * math.log(factor) + 1)
    return fields | dict(
        rope_type='yarn', rope_factor=factor, rope_original_max_len=original,
        rope_attention_factor=None if attention is None else float(attention),
        rope_beta_fast=float(params.get('beta_fast') or 32), rope_beta_slow=float(params.get('beta_slow') or 1),
        rope_truncate=bool(params.get('truncate', True))), None
  raise ValueError(f"{where}: {field}['rope_type']={rope_type!r} is not supported; rmjax reads 'default', "
                   "'dynamic' (exact up to original_max_position_embeddings, to which max_len is capped), "
                   "'linear', 'llama3' and 'yarn' ('longrope' would need per-dimension factor lists switched by "
                   'sequence length).')


def config_from_hf(cfg: Mapping[str, Any], *, dtype: str = 'float32', where: str = CONFIG_FILE) -> ModelConfig:
  """The `ModelConfig` of a Hugging Face `config.json` dict (Llama, Qwen2 or GPT-2)."""
  if dtype not in LOAD_DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {LOAD_DTYPES}.')
  model_type = cfg.get('model_type')
  common = dict(vocab_size=int(cfg['vocab_size']), dtype=dtype, param_dtype=dtype)
  if model_type in _LLAMA_TYPES:
    if cfg.get('hidden_act', 'silu') != 'silu':
      raise ValueError(f'{where}: hidden_act={cfg["hidden_act"]!r}; the llama family uses "silu".')
    width, heads = int(cfg['hidden_size']), int(cfg['num_attention_heads'])
    head_dim = cfg.get('head_dim') or width // heads
    rope, cap = _rope(cfg, where)
    max_len = int(cfg.get('max_position_embeddings', 2048))
    if model_type == 'qwen2' and cfg.get('use_sliding_window'):
      cap = min(cap or max_len, int(cfg['sliding_window']))
    mlp_bias = bool(cfg.get('mlp_bias', False))
    return ModelConfig(
        width=width, mlp_width=int(cfg['intermediate_size']), num_layers=int(cfg['num_hidden_layers']),
        num_heads=heads, num_kv_heads=int(cfg.get('num_key_value_heads') or heads), family='llama',
        head_dim=None if head_dim * heads == width else int(head_dim), max_len=min(max_len, cap or max_len),
        norm_eps=float(cfg.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(cfg.get('tie_word_embeddings', False)),
        attn_bias=model_type == 'qwen2' or bool(cfg.get('attention_bias', False)), mlp_bias=mlp_bias, **rope,
        **common)
  if model_type == 'gpt2':
    act = cfg.get('activation_function', 'gelu_new')
    if act not in _GPT2_ACTS:
      raise ValueError(f'{where}: activation_function={act!r}; rmjax\'s gpt2 MLP is the tanh GELU {_GPT2_ACTS}.')
    if not cfg.get('scale_attn_weights', True) or cfg.get('scale_attn_by_inverse_layer_idx', False):
      raise ValueError(f'{where}: rmjax scales attention by 1/sqrt(head_dim) only; scale_attn_weights must be '
                       'true and scale_attn_by_inverse_layer_idx false.')
    width = int(cfg['n_embd'])
    return ModelConfig(
        width=width, mlp_width=int(cfg.get('n_inner') or 4 * width), num_layers=int(cfg['n_layer']),
        num_heads=int(cfg['n_head']), num_kv_heads=int(cfg['n_head']), family='gpt2',
        max_len=int(cfg['n_positions']), norm_eps=float(cfg.get('layer_norm_epsilon', 1e-5)),
        tie_embeddings=bool(cfg.get('tie_word_embeddings', True)), attn_bias=True, mlp_bias=True, **common)
  raise ValueError(f'{where}: model_type={model_type!r} is not supported; supported: {_LLAMA_TYPES + ("gpt2",)}.')


def _model_type(config: ModelConfig) -> str:
  """The `transformers` family that represents `config` exactly."""
  if config.family == 'gpt2':
    if not (config.attn_bias and config.mlp_bias):
      raise ValueError('save: a gpt2 model without attention or MLP biases has no transformers equivalent; '
                       'use attn_bias=True, mlp_bias=True.')
    return 'gpt2'
  return 'qwen2' if config.attn_bias and not config.mlp_bias else 'llama'


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
  """`rope_parameters` of config.json for the rope fields of `config` (inverse of `_rope`)."""
  c = config
  out: dict[str, Any] = {'rope_type': c.rope_type, 'rope_theta': c.rope_theta}
  if c.rope_type != 'default':
    out['factor'] = c.rope_factor
  if c.rope_type in ('llama3', 'yarn'):
    out['original_max_position_embeddings'] = c.rope_original_max_len
  if c.rope_type == 'llama3':
    out.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
  if c.rope_type == 'yarn':
    out.update(beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, truncate=c.rope_truncate)
    if c.rope_attention_factor is not None:
      out['attention_factor'] = c.rope_attention_factor
  return out


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The `config.json` fields (without architectures / labels) for `config`."""
  model_type = _model_type(config)
  dtype = config.param_dtype
  if model_type == 'gpt2':
    return dict(model_type='gpt2', vocab_size=config.vocab_size, n_embd=config.width, n_inner=config.mlp_width,
                n_layer=config.num_layers, n_head=config.num_heads, n_positions=config.max_len,
                layer_norm_epsilon=config.norm_eps, activation_function='gelu_new', scale_attn_weights=True,
                tie_word_embeddings=config.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                dtype=dtype)
  out = dict(model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.width,
             intermediate_size=config.mlp_width, num_hidden_layers=config.num_layers,
             num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
             head_dim=config.head_width, max_position_embeddings=config.max_len, rms_norm_eps=config.norm_eps,
             hidden_act='silu', tie_word_embeddings=config.tie_embeddings,
             rope_parameters=_rope_parameters(config), rope_theta=config.rope_theta, attention_dropout=0.0,
             dtype=dtype)
  if model_type == 'llama':
    out.update(attention_bias=config.attn_bias, mlp_bias=config.mlp_bias)
  return out


# --------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """An rmjax leaf `path` made of HF tensors `parts` concatenated on the last axis
  (each transposed first when `transpose`); `widths` are the parts' sizes on that axis."""
  path: tuple[str, ...]
  parts: tuple[str, ...]
  widths: tuple[int, ...]
  transpose: bool


def _leaves(config: ModelConfig, model_type: str, prefix: str, head: str | None, num_labels: int) -> list[_Leaf]:
  c = config
  d, f, hd = c.width, c.mlp_width, c.head_width
  q, kv = c.num_heads * hd, c.num_kv_heads * hd
  out: list[_Leaf] = []

  def add(path: str, parts: Sequence[str], widths: Sequence[int], transpose: bool, base: str = prefix):
    out.append(_Leaf(tuple(path.split('/')), tuple(base + p for p in parts), tuple(widths), transpose))

  if model_type == 'gpt2':
    add('backbone/embed/embedding', ['wte.weight'], [d], False)
    add('backbone/pos_embed/embedding', ['wpe.weight'], [d], False)
    for i in range(c.num_layers):
      h, r = f'h.{i}.', f'backbone/layers_{i}/'
      for ours, theirs, width in (('attn_norm', 'ln_1', d), ('mlp_norm', 'ln_2', d)):
        add(r + ours + '/scale', [h + theirs + '.weight'], [width], False)
        add(r + ours + '/bias', [h + theirs + '.bias'], [width], False)
      for ours, theirs, width in (('attn/qkv', 'attn.c_attn', q + 2 * kv), ('attn/out', 'attn.c_proj', d),
                                  ('mlp/fc', 'mlp.c_fc', f), ('mlp/down', 'mlp.c_proj', d)):
        add(r + ours + '/kernel', [h + theirs + '.weight'], [width], False)
        add(r + ours + '/bias', [h + theirs + '.bias'], [width], False)
    add('backbone/final_norm/scale', ['ln_f.weight'], [d], False)
    add('backbone/final_norm/bias', ['ln_f.bias'], [d], False)
  else:
    add('backbone/embed/embedding', ['embed_tokens.weight'], [d], False)
    for i in range(c.num_layers):
      h, r = f'layers.{i}.', f'backbone/layers_{i}/'
      a, m = h + 'self_attn.', h + 'mlp.'
      add(r + 'attn_norm/scale', [h + 'input_layernorm.weight'], [d], False)
      add(r + 'attn/qkv/kernel', [a + 'q_proj.weight', a + 'k_proj.weight', a + 'v_proj.weight'], [q, kv, kv], True)
      if c.attn_bias:
        add(r + 'attn/qkv/bias', [a + 'q_proj.bias', a + 'k_proj.bias', a + 'v_proj.bias'], [q, kv, kv], False)
      add(r + 'attn/out/kernel', [a + 'o_proj.weight'], [d], True)
      add(r + 'mlp_norm/scale', [h + 'post_attention_layernorm.weight'], [d], False)
      add(r + 'mlp/gate_up/kernel', [m + 'gate_proj.weight', m + 'up_proj.weight'], [f, f], True)
      if c.mlp_bias:
        add(r + 'mlp/gate_up/bias', [m + 'gate_proj.bias', m + 'up_proj.bias'], [f, f], False)
      add(r + 'mlp/down/kernel', [m + 'down_proj.weight'], [d], True)
      if c.mlp_bias:
        add(r + 'mlp/down/bias', [m + 'down_proj.bias'], [d], False)
    add('backbone/final_norm/scale', ['norm.weight'], [d], False)
  if head == 'lm' and not c.tie_embeddings:
    add('lm_head/kernel', ['lm_head.weight'], [c.vocab_size], True, base='')
  if head == 'score':
    add('reward_head/kernel', ['score.weight'], [num_labels], True, base='')
  return out


def _zero_o_bias_names(config: ModelConfig, model_type: str, prefix: str) -> list[str]:
  """Llama with attention_bias has an o_proj bias that rmjax's llama family does not: kept at 0."""
  if model_type != 'llama' or not config.attn_bias:
    return []
  return [f'{prefix}layers.{i}.self_attn.o_proj.bias' for i in range(config.num_layers)]


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f'save: params have no leaf {"/".join(path)}; they do not match the config.')
    tree = tree[key]
  return tree


def inspect(path: PathLike, *, dtype: str = 'float32') -> tuple[ModelConfig, HFInfo]:
  """The `ModelConfig` and `HFInfo` of a model folder, from config.json and the tensor names only."""
  folder = pathlib.Path(path)
  cfg_file = folder / CONFIG_FILE
  if not cfg_file.is_file():
    raise ValueError(f'{folder}: no {CONFIG_FILE}; give a Hugging Face model folder.')
  raw = json.loads(cfg_file.read_text())
  config = config_from_hf(raw, dtype=dtype, where=str(cfg_file))
  names = set(folder_tensors(folder))
  embed = 'wte.weight' if config.family == 'gpt2' else 'embed_tokens.weight'
  prefix = next((p for p in ('model.', 'transformer.', '') if p + embed in names), None)
  if prefix is None:
    raise ValueError(f'{folder}: no token embedding tensor (*{embed}) found; is this a {raw["model_type"]} model?')
  if 'score.weight' in names:
    head, num_labels = 'score', int(raw.get('num_labels', len(raw.get('id2label', {})) or 1))
  elif prefix:
    head, num_labels = 'lm', 0
    if not config.tie_embeddings and 'lm_head.weight' not in names:
      raise ValueError(f'{folder}: tie_word_embeddings is false but lm_head.weight is missing.')
  else:
    head, num_labels = None, 0
  return config, HFInfo(raw['model_type'], head, num_labels, prefix, raw)


def load(path: PathLike, *, dtype: str = 'float32') -> tuple[Params, ModelConfig]:
  """Reads a Llama / Qwen2 / GPT-2 folder into (params, ModelConfig); leaves are numpy arrays.

  A causal-LM folder gives the LM tree (`backbone`, and `lm_head` unless tied), a base-model
  folder (`LlamaModel`, ...) the `backbone` only, a sequence-classification folder `backbone`
  plus `reward_head` (kernel [D, K], bias [K] from `rmjax_score_bias`, else 0). `dtype`
  ('float32' or 'bfloat16') is the stored and compute dtype of the result. Tensors are read
  one at a time; fused leaves are filled part by part.
  """
  config, info = inspect(path, dtype=dtype)
  tensors = folder_tensors(path)
  target = np.dtype(jax.numpy.dtype(dtype))
  expected = expected_shapes(config, info.head, info.num_labels)
  params: Params = {}
  with _Reader(tensors) as reader:
    for name in _zero_o_bias_names(config, info.model_type, info.prefix):
      if np.any(reader.read(name)):
        raise ValueError(f'{path}: {name} is not zero; rmjax\'s llama family has no bias on the attention '
                         'output projection.')
    for leaf in _leaves(config, info.model_type, info.prefix, info.head, info.num_labels):
      shape = expected[leaf.path]
      value = None if len(leaf.parts) > 1 or leaf.transpose else reader.read(leaf.parts[0])
      if value is not None:
        _check_part(path, leaf.parts[0], value.shape, shape)
        value = value if value.dtype == target else value.astype(target)
      else:
        value = np.empty(shape, target)
        start = 0
        for part, width in zip(leaf.parts, leaf.widths):
          array = reader.read(part)
          array = array.T if leaf.transpose else array
          _check_part(path, part, array.shape, shape[:-1] + (width,))
          value[..., start:start + width] = array
          start += width
          del array
      _set(params, leaf.path, value)
  if info.head == 'score':
    bias = np.asarray(info.raw.get('rmjax_score_bias', [0.0] * info.num_labels), np.float64)
    if bias.shape != (info.num_labels,):
      raise ValueError(f'{path}/{CONFIG_FILE}: rmjax_score_bias has {bias.size} values for {info.num_labels} labels.')
    params['reward_head']['bias'] = bias.astype(target)
  return params, config


def _check_part(path: PathLike, name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
  if tuple(shape) != tuple(want):
    raise ValueError(f'{path}: tensor {name!r} has shape {tuple(shape)} (as rmjax reads it); config.json implies '
                     f'{tuple(want)}.')


def expected_shapes(config: ModelConfig, head: str | None, num_labels: int) -> dict[tuple[str, ...], tuple]:
  """Leaf path -> shape of the rmjax tree a folder with this head maps to (from an abstract init)."""
  if head == 'score':
    tree = jax.eval_shape(RewardModel(config, num_labels, 'multi_head').init, jax.random.key(0))
  else:
    tree = jax.eval_shape(lambda key: init_lm(key, config), jax.random.key(0))
    if head is None:
      tree = {'backbone': tree['backbone']}
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in p): tuple(x.shape) for p, x in flat}


# --------------------------------------------------------------------------- saving


def _hf_tensors(params: Params, config: ModelConfig, model_type: str, prefix: str, head: str | None,
                num_labels: int) -> list[tuple[str, Any]]:
  """(HF name, (shape, dtype, make)) for every tensor of the folder, in the rmjax leaf order."""
  if config.scan_layers:  # Hugging Face folders hold one tensor per layer
    params = unstack_layers(params, config.num_layers)
  out = []
  for leaf in _leaves(config, model_type, prefix, head, num_labels):
    value = np.asarray(_get(params, leaf.path))
    start = 0
    for part, width in zip(leaf.parts, leaf.widths):
      piece = value[..., start:start + width]
      piece = piece.T if leaf.transpose else piece
      out.append((part, (piece.shape, value.dtype, lambda p=piece: p)))
      start += width
  for name in _zero_o_bias_names(config, model_type, prefix):
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    out.append((name, ((config.width,), dtype, lambda: np.zeros(config.width, dtype))))
  return out


def _write_folder(folder: pathlib.Path, tensors: list[tuple[str, Any]], hf_config: dict[str, Any],
                  max_shard_bytes: int | None, overwrite: bool) -> None:
  if (folder / CONFIG_FILE).exists():
    if not overwrite:
      raise ValueError(f'save: {folder} already holds a model ({CONFIG_FILE}); pass overwrite=True to replace it.')
    for old in [*folder.glob('*.safetensors'), folder / INDEX_FILE]:
      old.unlink(missing_ok=True)
  folder.mkdir(parents=True, exist_ok=True)
  sizes = [math.prod(shape) * dtype.itemsize for _, (shape, dtype, _) in tensors]
  shards: list[list[tuple[str, Any]]] = [[]]
  used = 0
  for tensor, size in zip(tensors, sizes):
    if max_shard_bytes is not None and shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(tensor)
    used += size
  if len(shards) == 1:
    _write_safetensors(folder / WEIGHTS_FILE, shards[0])
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    for name, shard in zip(names, shards):
      _write_safetensors(folder / name, shard)
    index = {'metadata': {'total_size': sum(sizes)},
             'weight_map': {t: name for name, shard in zip(names, shards) for t, _ in shard}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
  (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))


def _special_ids(tokenizer: Any, pad_token_id: int | None) -> dict[str, int | None]:
  ids = {'pad_token_id': pad_token_id, 'bos_token_id': None, 'eos_token_id': None}
  if tokenizer is not None:
    ids = {'pad_token_id': tokenizer.pad_id if pad_token_id is None else pad_token_id,
           'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id}
  return ids


def _normalization(normalization: Any, k: int) -> tuple[np.ndarray, np.ndarray] | None:
  if normalization is None:
    return None
  if isinstance(normalization, Mapping):
    mean, std = normalization['mean'], normalization['std']
  else:
    mean, std = normalization.mean, normalization.std
  mean, std = np.asarray(mean, np.float64).reshape(-1), np.asarray(std, np.float64).reshape(-1)
  if mean.shape != (k,) or std.shape != (k,):
    raise ValueError(f'save: normalization mean / std have shapes {mean.shape} / {std.shape}; the reward model '
                     f'has {k} members.')
  return mean, std


def save(params: Params, config: ModelConfig | RewardModel, path: PathLike, *, tokenizer: Any = None,
         chat_template: Any = None, normalization: Any = None, pad_token_id: int | None = None,
         keep_score_bias: bool = False, max_shard_bytes: int | None = None,
         overwrite: bool = False) -> list[pathlib.Path]:
  """Writes folders that `transformers` loads with `from_pretrained`; returns the folders written.

  config: a `ModelConfig` -> one causal-LM folder (`LlamaForCausalLM`, `Qwen2ForCausalLM` or
    `GPT2LMHeadModel`: Qwen2 when the llama family has qkv biases and no MLP biases, else Llama;
    Llama with both biases gets a zero `o_proj.bias`). A `RewardModel` -> sequence
    classification: kind 'full' writes `path/member_{k}` for each of the K members (one label
    each), 'multi_head' one folder with K labels.
  tokenizer: its pad / bos / eos ids go to config.json; an `HFTokenizer` is also written
    (`rmjax.data.chat.save_tokenizer`, with `chat_template`, a `ChatTemplate`). For a reward
    model the pad id must differ from bos and eos, since `transformers` scores the rightmost
    token that is not the pad.
  normalization: per-member `mean`, `std` `[K]` (a `RewardStats` or a dict), kept in config.json.
  keep_score_bias: a reward head bias that is not 0 is refused (transformers' head has none)
    unless this is True; it is then stored as `rmjax_score_bias`, and transformers' raw score
    is rmjax's minus it.
  max_shard_bytes: split the weights into shards of at most this size (plus the index file).
  Leaves are written in their stored dtype, tensor by tensor. Params of a `scan_layers` config
  (layers stacked) are written per layer; `load` always gives the per-layer layout
  (`transformer.stack_layers` converts it).
  """
  path = pathlib.Path(path)
  rm = config if isinstance(config, RewardModel) else None
  model_config = rm.config if rm is not None else config
  if not isinstance(model_config, ModelConfig):
    raise ValueError(f'save: config must be a ModelConfig or a RewardModel; got {type(config).__name__}.')
  model_type = _model_type(model_config)
  prefix = 'transformer.' if model_type == 'gpt2' else 'model.'
  base = config_to_hf(model_config) | _special_ids(tokenizer, pad_token_id)
  cls = {'gpt2': 'GPT2', 'llama': 'Llama', 'qwen2': 'Qwen2'}[model_type]
  if rm is None:
    hf_config = base | {'architectures': [cls + ('LMHeadModel' if model_type == 'gpt2' else 'ForCausalLM')]}
    _write_folder(path, _hf_tensors(params, model_config, model_type, prefix, 'lm', 0), hf_config,
                  max_shard_bytes, overwrite)
    folders = [path]
  else:
    ids = base['pad_token_id'], base['bos_token_id'], base['eos_token_id']
    if ids[0] is None or ids[0] in ids[1:]:
      raise ValueError(f'save: a reward model needs a pad id that differs from bos and eos (got pad={ids[0]}, '
                       f'bos={ids[1]}, eos={ids[2]}): transformers scores the rightmost non-pad token. Pass a '
                       'tokenizer with its own pad token, or pad_token_id=.')
    k = rm.num_members
    stats = _normalization(normalization, k)
    bias = np.asarray(params['reward_head']['bias'], np.float64)
    if np.any(bias != 0) and not keep_score_bias:
      raise ValueError(f'save: the reward head bias is {bias.reshape(-1).tolist()}, not 0, and transformers\' '
                       'score head has no bias. Train with config.ensemble.head_bias="zero" (pairwise losses do '
                       'not depend on it; it then stays exactly 0), or pass keep_score_bias=True to store it as '
                       'rmjax_score_bias in config.json (transformers\' raw score is then rmjax\'s minus it).')
    members = ([jax.tree.map(lambda x, i=i: np.asarray(x)[i], params) for i in range(k)] if rm.kind == 'full'
               else [params])
    folders = [path / f'{MEMBER_PREFIX}{i}' for i in range(k)] if rm.kind == 'full' else [path]
    labels = 1 if rm.kind == 'full' else k
    for i, (member, folder) in enumerate(zip(members, folders)):
      extra: dict[str, Any] = {'architectures': [cls + 'ForSequenceClassification'],
                               'id2label': {str(j): f'LABEL_{j}' for j in range(labels)},
                               'label2id': {f'LABEL_{j}': j for j in range(labels)}}
      if keep_score_bias:
        extra['rmjax_score_bias'] = np.asarray(member['reward_head']['bias'], np.float64).reshape(-1).tolist()
      if stats is not None:
        sl = slice(i, i + 1) if rm.kind == 'full' else slice(None)
        extra['rmjax_normalization'] = {'mean': stats[0][sl].tolist(), 'std': stats[1][sl].tolist()}
      _write_folder(folder, _hf_tensors(member, model_config, model_type, prefix, 'score', labels), base | extra,
                    max_shard_bytes, overwrite)
  if tokenizer is not None and hasattr(tokenizer, 'to_dict') and tokenizer.to_dict().get('kind') == 'hf':
    from rmjax.data import chat  # the data package depends on nothing in rmjax.models.
    for folder in folders:
      chat.save_tokenizer(tokenizer, folder, chat_template=chat_template)
  return folders


# --------------------------------------------------------------------------- reward models


def reward_model_from_backbone(rng: jax.Array, params: Params, config: ModelConfig, *, num_members: int = 1,
                               kind: str = 'full') -> tuple[RewardModel, Params]:
  """A reward model whose members all start from the backbone of `params` (an LM or a backbone
  tree from `load`), with new heads initialised from `rng` (member i from `split(rng, K)[i]`)."""
  if 'backbone' not in params:
    raise ValueError(f'reward_model_from_backbone: params have no "backbone" (keys {sorted(params)}).')
  rm = RewardModel(config, num_members=num_members, kind=kind)
  fresh = jax.jit(rm.init)(rng)
  backbone = params['backbone']
  if kind == 'full':
    backbone = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_members,) + np.shape(x)), backbone)
  return rm, {**fresh, 'backbone': backbone}


class LoadedRewardModel(NamedTuple):
  """A reward model read from sequence-classification folders: the model, its params and the
  per-member normalization `mean`, `std` `[K]` (None when the folders carry none)."""
  model: RewardModel
  params: Params
  normalization: tuple[np.ndarray, np.ndarray] | None


def load_reward_model(path: PathLike | Sequence[PathLike], *, dtype: str = 'float32') -> LoadedRewardModel:
  """Reads a reward model: one sequence-classification folder (K labels -> 'multi_head', one
  label -> a 'full' model with K = 1), a folder of `member_{k}` folders, or a list of folders
  (a 'full' ensemble, members stacked in the given order; every folder must have one label)."""
  if isinstance(path, (str, pathlib.Path)):
    root = pathlib.Path(path)
    members = sorted(root.glob(MEMBER_PREFIX + '*'), key=lambda p: int(p.name[len(MEMBER_PREFIX):]))
    folders = members or [root]
  else:
    folders = [pathlib.Path(p) for p in path]
  loaded = [load(f, dtype=dtype) for f in folders]
  configs = {c for _, c in loaded}
  if len(configs) != 1:
    raise ValueError(f'load_reward_model: the folders {folders} have different model configs.')
  config = configs.pop()
  heads = [p.get('reward_head', {}).get('kernel') for p, _ in loaded]
  if any(h is None for h in heads):
    raise ValueError(f'load_reward_model: {[str(f) for f, h in zip(folders, heads) if h is None]} hold no '
                     'score.weight; they are not sequence-classification checkpoints (use load() and '
                     'reward_model_from_backbone()).')
  labels = heads[0].shape[1]
  raws = [json.loads((f / CONFIG_FILE).read_text()) for f in folders]
  stats = [r.get('rmjax_normalization') for r in raws]
  if len(folders) == 1 and labels > 1:
    rm, params = RewardModel(config, labels, 'multi_head'), loaded[0][0]
  else:
    if any(h.shape[1] != 1 for h in heads):
      raise ValueError(f'load_reward_model: ensemble members must have one label each; {folders} have '
                       f'{[h.shape[1] for h in heads]}.')
    rm = RewardModel(config, len(folders), 'full')
    params = jax.tree.map(lambda *xs: np.stack(xs), *[p for p, _ in loaded])
  normalization = None
  if all(s is not None for s in stats):
    normalization = (np.concatenate([np.asarray(s['mean'], np.float32).reshape(-1) for s in stats]),
                     np.concatenate([np.asarray(s['std'], np.float32).reshape(-1) for s in stats]))
  return LoadedRewardModel(rm, params, normalization)
