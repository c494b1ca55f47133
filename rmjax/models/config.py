"""Model configurations: explicit fields, named sizes, JSON round trip.

A `ModelConfig` fully determines the shapes of a decoder-only transformer, so that it
can be stored in a checkpoint's metadata and the model rebuilt from it with no other
file. Named sizes: `tiny` and `small` are the shapes of `shared/PERF_NOTES.md` (so that
benchmarks compare like with like), `base` is about 100M parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ('llama', 'gpt2')
ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')
REMAT = ('none', 'block')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of a decoder-only transformer.

  family: 'llama' (RMSNorm, rotary embeddings, GQA, SwiGLU) or 'gpt2' (learned
    positions, LayerNorm, GELU MLP; num_kv_heads == num_heads).
  width: model (residual) width D. mlp_width: hidden width F of the MLP.
  head_dim: per-head width; None means width // num_heads.
  max_len: longest sequence (size of the learned position table for gpt2, and of the
    KV cache bound).
  tie_embeddings: the LM head reuses the token embedding (transposed).
  attn_bias / mlp_bias: biases on the attention (qkv, and out for gpt2) / MLP dots.
  dtype: compute dtype; param_dtype: storage dtype of the parameters ('float32' or 'bfloat16';
    norms, softmax and the heads' outputs stay float32 whatever the compute dtype).
  remat: 'block' wraps each transformer block in `nn.remat`: the backward pass recomputes the
    block's activations from its input instead of keeping them (memory O(L·B·T·D) for the
    residual stream instead of every intermediate, at about one extra forward pass); 'none' keeps
    them. Results are the same.
  scan_layers: run the L blocks as one `nn.scan` over a block whose parameters are stacked on a
    leading layer axis (`backbone/layers/...` `[L, ...]` instead of `backbone/layers_{i}/...`): one
    block is compiled instead of L. Convert parameters with `transformer.stack_layers` /
    `unstack_layers`.

  Rotary scaling (llama family, applied by `transformer.rope_tables`). With hd the head
  width, base inverse frequencies w_i = rope_theta^(-2i/hd) (i < hd/2), wavelengths
  l_i = 2 pi / w_i, L = rope_original_max_len (the pretraining context) and s = rope_factor:
    'default': w_i.
    'linear':  w_i / s, i.e. positions divided by s (position interpolation, Chen et al. 2023).
    'llama3':  w_i where l_i < L / rope_high_freq_factor; w_i / s where l_i > L /
               rope_low_freq_factor; in between (1 - g) w_i / s + g w_i with
               g = (L / l_i - low) / (high - low) (Llama 3 report, Grattafiori et al. 2024).
    'yarn':    (1 - g_i) w_i / s + g_i w_i, g_i = 1 - clip((i - a) / (b - a), 0, 1), where a, b
               are the indices whose frequency turns beta_fast, beta_slow times over L:
               i(r) = hd ln(L / (2 pi r)) / (2 ln rope_theta), a = max(floor(i(rope_beta_fast)), 0),
               b = min(ceil(i(rope_beta_slow)), hd - 1) (no floor / ceil if not rope_truncate;
               b += 0.001 when a == b). cos and sin are multiplied by rope_attention_factor,
               None meaning 0.1 ln(s) + 1 (YaRN, Peng et al. 2023; the ramp is linear in i, as
               in its reference code and in `transformers`).
  """
  vocab_size: int
  width: int
  mlp_width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  family: str = 'llama'
  head_dim: int | None = None
  max_len: int = 1024
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_original_max_len: int | None = None
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_attention_factor: float | None = None
  rope_truncate: bool = True
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  attn_bias: bool = False
  mlp_bias: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'ModelConfig.family={self.family!r}: expected one of {FAMILIES}.')
    for name in ('vocab_size', 'width', 'mlp_width', 'num_layers', 'num_heads', 'num_kv_heads', 'max_len'):
      if getattr(self, name) <= 0:
        raise ValueError(f'ModelConfig.{name}={getattr(self, name)}: must be a positive integer.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'ModelConfig: num_heads={self.num_heads} must be a multiple of '
                       f'num_kv_heads={self.num_kv_heads}.')
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f'ModelConfig: width={self.width} is not divisible by num_heads={self.num_heads}; '
                       'set head_dim explicitly.')
    if self.family == 'gpt2' and self.num_kv_heads != self.num_heads:
      raise ValueError('ModelConfig: the gpt2 family has no grouped-query attention; '
                       f'set num_kv_heads={self.num_heads} (= num_heads).')
    for name, choices in (('remat', REMAT), ('dtype', DTYPES), ('param_dtype', DTYPES)):
      if getattr(self, name) not in choices:
        raise ValueError(f'ModelConfig.{name}={getattr(self, name)!r}: expected one of {choices}.')
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f'ModelConfig.scan_layers={self.scan_layers!r}: expected True or False.')
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'ModelConfig.rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}.')
    if self.rope_type != 'default' and not self.rope_factor > 0:
      raise ValueError(f'ModelConfig.rope_factor={self.rope_factor}: must be positive.')
    if self.rope_type in ('llama3', 'yarn') and not self.rope_original_max_len:
      raise ValueError(f'ModelConfig.rope_original_max_len is required by rope_type={self.rope_type!r} '
                       '(the pretraining context length).')
    if self.rope_type == 'llama3' and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(f'ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor} must exceed '
                       f'rope_low_freq_factor={self.rope_low_freq_factor}.')

  @property
  def head_width(self) -> int:
    return self.head_dim if self.head_dim is not None else self.width // self.num_heads

  def replace(self, **changes: Any) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ModelConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'ModelConfig: unknown fields {unknown}; valid fields are {sorted(names)}.')
    return cls(**d)


SIZES: dict[str, ModelConfig] = {
    # shared/PERF_NOTES.md `tiny`: 124k parameters as a reward model.
    'tiny': ModelConfig(vocab_size=512, width=64, mlp_width=172, num_layers=2, num_heads=4, num_kv_heads=2),
    # shared/PERF_NOTES.md `small`: 5.4M parameters as a reward model.
    'small': ModelConfig(vocab_size=4096, width=256, mlp_width=688, num_layers=6, num_heads=8, num_kv_heads=4),
    # about 100M parameters as a reward model (24.6M embedding + 12 x 6.3M blocks).
    'base': ModelConfig(vocab_size=32000, width=768, mlp_width=2048, num_layers=12, num_heads=12, num_kv_heads=4,
                        max_len=2048),
}


def get_size(name: str, **overrides: Any) -> ModelConfig:
  """The named size, with fields replaced by `overrides` (e.g. vocab_size)."""
  if name not in SIZES:
    raise ValueError(f'unknown model size {name!r}; known sizes: {sorted(SIZES)}.')
  return SIZES[name].replace(**overrides)
