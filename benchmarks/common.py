"""What every framework's worker shares: shapes, weights, batches, FLOP counts, the protocol.

Imports only the standard library and numpy, so that each peer's own environment can load it.

Weights are made here, in numpy, in rmjax's flat layout (`backbone/layers_0/attn/qkv/kernel`
etc., kernels `[in, out]`, see docs/models.md) with N(0, 0.02) matrices and unit norm scales,
and every framework loads the same arrays.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np

THREADS = 2
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Shape:
  """A Llama-style model: vocab V, width D, MLP width F, L layers, H heads, KV heads (fp32)."""
  name: str
  vocab: int
  width: int
  mlp: int
  layers: int
  heads: int
  kv_heads: int
  max_len: int = 1024
  rope_theta: float = 1e6  # Tunix applies 1e6 whatever its config says
  norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


SHAPES = {
    'tiny': Shape('tiny', vocab=512, width=64, mlp=172, layers=2, heads=4, kv_heads=2),
    'small': Shape('small', vocab=4096, width=256, mlp=688, layers=6, heads=8, kv_heads=4),
    'base': Shape('base', vocab=32000, width=768, mlp=2048, layers=12, heads=12, kv_heads=4, max_len=2048),
}

# Optimizer shared by every framework: AdamW, constant lr, global-norm clipping.
OPTIM = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0)


# Nominal dense matmul peaks, TFLOP/s without sparsity, from NVIDIA's datasheets (A100 2021; H100, H100 NVL,
# H200 and H200 NVL 2024; the sparse figures there are twice these), for model FLOPs utilization on GPUs.
# The first entry whose name is in `jax.Device.device_kind` applies ('H100 PCIe' before 'H100').
PEAK_TFLOPS = (
    ('H100 PCIe', {'float32': 51.0, 'tf32': 378.0, 'bfloat16': 756.0}),
    ('H100 NVL', {'float32': 60.0, 'tf32': 418.0, 'bfloat16': 835.0}),
    ('H100', {'float32': 67.0, 'tf32': 495.0, 'bfloat16': 989.0}),
    ('H200 NVL', {'float32': 60.0, 'tf32': 418.0, 'bfloat16': 835.0}),
    ('H200', {'float32': 67.0, 'tf32': 495.0, 'bfloat16': 989.0}),
    ('A100', {'float32': 19.5, 'tf32': 156.0, 'bfloat16': 312.0}),
)


def peak_tflops(device_kind: str, matmul_precision: str | None) -> tuple[float, str] | None:
  """(TFLOP/s, mode) that fp32 dots can reach on `device_kind` under jax's `jax_default_matmul_precision`
  setting, or None for a device without a nominal peak here (CPUs: their rate is measured instead).

  jax computes fp32 dots on these GPUs in TF32 unless the precision is 'highest' / 'float32'
  (docs.jax.dev, "Matmul precision"); 'bfloat16' rounds their inputs to bf16.
  """
  mode = {'highest': 'float32', 'float32': 'float32', 'bfloat16': 'bfloat16'}.get(matmul_precision or '', 'tf32')
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks[mode], mode
  return None


def jax_device() -> dict[str, Any]:
  """The device a jax worker computes on: platform, kind and the default matmul precision (None: jax's default)."""
  import jax
  d = jax.devices()[0]
  return {'platform': d.platform, 'kind': d.device_kind, 'matmul_precision': jax.config.jax_default_matmul_precision}


def check_precision():
  """Context in which a jax worker computes the values compared across frameworks (`run.CHECK_TOL`): float32
  dots on every device. jax's default for fp32 dots is float32 on the CPU but TF32 on NVIDIA GPUs (inputs
  rounded to 10 mantissa bits, a relative error of about 2^-11 a product: the order of the 1e-4 tolerances);
  the timed programs keep the default."""
  import jax
  return jax.default_matmul_precision('float32')


def shape(name: str) -> Shape:
  if name not in SHAPES:
    raise ValueError(f'unknown shape {name!r}; known: {sorted(SHAPES)}.')
  return SHAPES[name]


# ----------------------------------------------------------------------------- threads


def pin_threads() -> dict[str, Any]:
  """Restricts this process to `THREADS` CPUs and thread pools; call before importing a framework.

  XLA:CPU sizes its thread pool from the CPUs the process may run on (it has no flag for it), and the
  OpenMP / BLAS pools of PyTorch and numpy follow the variables set here."""
  cpus = sorted(os.sched_getaffinity(0))[:THREADS]
  os.sched_setaffinity(0, cpus)
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    os.environ[var] = str(THREADS)
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  return {'cpus': cpus}


def check_cpus() -> int:
  n = len(os.sched_getaffinity(0))
  if n > THREADS:
    raise RuntimeError(f'worker runs on {n} CPUs; the comparison needs {THREADS}.')
  return n


# ----------------------------------------------------------------------------- weights and data


def init_weights(s: Shape, seed: int, *, lm_head: bool, reward_heads: int = 0) -> dict[str, np.ndarray]:
  """Flat rmjax-layout parameters: `path -> array` (fp32). `reward_heads` K adds `reward_head/kernel [D, K]`."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.standard_normal(shape) * INIT_STD).astype(np.float32)
  d, hd = s.width, s.head_dim
  w = {'backbone/embed/embedding': normal(s.vocab, d)}
  for i in range(s.layers):
    p = f'backbone/layers_{i}'
    w[f'{p}/attn_norm/scale'] = np.ones(d, np.float32)
    w[f'{p}/attn/qkv/kernel'] = normal(d, (s.heads + 2 * s.kv_heads) * hd)
    w[f'{p}/attn/out/kernel'] = normal(s.heads * hd, d)
    w[f'{p}/mlp_norm/scale'] = np.ones(d, np.float32)
    w[f'{p}/mlp/gate_up/kernel'] = normal(d, 2 * s.mlp)
    w[f'{p}/mlp/down/kernel'] = normal(s.mlp, d)
  w['backbone/final_norm/scale'] = np.ones(d, np.float32)
  if lm_head:
    w['lm_head/kernel'] = normal(d, s.vocab)
  if reward_heads:
    w['reward_head/kernel'] = normal(d, reward_heads)
    w['reward_head/bias'] = np.zeros(reward_heads, np.float32)
  return w


def pair_batch(s: Shape, pairs: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """Chosen / rejected tokens `[B, T]` int32 drawn from ids 1..V-1 (0 is the pad id), every token real."""
  rng = np.random.default_rng(seed)
  draw = lambda: rng.integers(1, s.vocab, (pairs, seq_len), dtype=np.int32)
  return {'chosen': draw(), 'rejected': draw()}


def prompts(s: Shape, rows: int, prompt_len: int, seed: int) -> np.ndarray:
  """Prompt tokens `[B, P]` int32 from ids 1..V-1, no padding."""
  return np.random.default_rng(seed).integers(1, s.vocab, (rows, prompt_len), dtype=np.int32)


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  np.savez(path, **{k.replace('/', '|'): v for k, v in arrays.items()})


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k.replace('|', '/'): f[k] for k in f.files}


# ----------------------------------------------------------------------------- FLOPs


def dense_flops_per_token(s: Shape) -> int:
  """Forward matmul FLOPs of one token through one block (projections and MLP, no attention):
  `2 D (H + 2 KV) hd + 2 H hd D + 6 D F` (qkv, out, gate+up, down)."""
  d, hd = s.width, s.head_dim
  return 2 * d * (s.heads + 2 * s.kv_heads) * hd + 2 * s.heads * hd * d + 6 * d * s.mlp


def attention_flops(s: Shape, keys: int) -> int:
  """Forward FLOPs of one query attending to `keys` keys in one block: `4 H hd S` (scores, values)."""
  return 4 * s.heads * s.head_dim * keys


def forward_flops(s: Shape, rows: int, seq_len: int, head_positions: int, head_width: int) -> int:
  """Forward FLOPs of a no-cache pass over `[rows, seq_len]` (every query against all `seq_len`
  keys, as computed) plus a head of `head_width` outputs at `head_positions` positions per row."""
  per_row = seq_len * s.layers * (dense_flops_per_token(s) + attention_flops(s, seq_len))
  return rows * (per_row + head_positions * 2 * s.width * head_width)


def rm_step_flops(s: Shape, pairs: int, seq_len: int, heads: int = 1) -> int:
  """Training step of a reward model on `pairs` pairs: 3 x forward over `[2B, T]` (fwd + 2 x bwd)."""
  return 3 * forward_flops(s, 2 * pairs, seq_len, 1, heads)


def generate_flops(s: Shape, rows: int, prompt_len: int, new_tokens: int) -> int:
  """KV-cache generation: prefill of `[B, P]` (head at the last position), then N - 1 steps of one
  token against a context of P + n keys, each with the LM head."""
  total = forward_flops(s, rows, prompt_len, 1, s.vocab)
  for n in range(1, new_tokens):
    ctx = prompt_len + n
    total += rows * (s.layers * (dense_flops_per_token(s) + attention_flops(s, ctx)) + 2 * s.width * s.vocab)
  return total


def grpo_flops(s: Shape, rows: int, prompt_len: int, new_tokens: int, epochs: int = 1) -> int:
  """One GRPO iteration: generation, the reference's forward over `[B, P + N]` and `epochs` x
  (forward + backward) of the policy, with the LM head on the N response positions."""
  fwd = forward_flops(s, rows, prompt_len + new_tokens, new_tokens, s.vocab)
  return generate_flops(s, rows, prompt_len, new_tokens) + fwd + 3 * epochs * fwd


def largest_matmul(s: Shape, tokens: int, lm_head: bool = False) -> tuple[int, int, int]:
  """(M, K, N) of the largest dot of a step over `tokens` rows: the fused gate_up, qkv or LM head."""
  cands = [(tokens, s.width, 2 * s.mlp), (tokens, s.width, (s.heads + 2 * s.kv_heads) * s.head_dim)]
  if lm_head:
    cands.append((tokens, s.width, s.vocab))
  return max(cands, key=lambda m: m[0] * m[1] * m[2])


# ----------------------------------------------------------------------------- worker protocol


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb() -> float | None:
  """Peak memory in use on a jax worker's accelerator (MB); None on a CPU or in a process without jax."""
  jax = sys.modules.get('jax')
  device = jax.devices()[0] if jax is not None else None
  stats = (device.memory_stats() or {}) if device is not None and device.platform != 'cpu' else {}
  return stats['peak_bytes_in_use'] / 2**20 if 'peak_bytes_in_use' in stats else None


def serve(handlers: dict[str, Any]) -> None:
  """Line protocol on stdin/stdout: `{"cmd": name, ...}` -> one JSON line `{"ok": ..., ...}`.

  stdout is moved aside first, so that a framework's own prints (to stdout) go to stderr.
  """
  out = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)
  for line in sys.stdin:
    req = json.loads(line)
    cmd = req.pop('cmd')
    if cmd == 'quit':
      out.write(json.dumps({'ok': True}) + '\n')
      out.flush()
      sys.stderr.flush()
      os._exit(0)  # trainers' background threads would otherwise keep the process alive
    try:
      res = handlers[cmd](**req)
      res = dict(res or {}, ok=True, peak_rss_mb=peak_rss_mb(), device_peak_mb=device_peak_mb())
    except Exception as e:  # reported to the orchestrator, which stops the workload
      import traceback
      traceback.print_exc()
      res = {'ok': False, 'error': f'{type(e).__name__}: {e}'}
    out.write(json.dumps(res) + '\n')


def timed(fn, steps: int) -> list[float]:
  """Seconds per call of `fn()` (which must block until its result is ready), `steps` calls."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_calls(calls: dict[str, Any], seconds: float) -> dict[str, list[float]]:
  """`{name: [seconds per call]}` for blocking calls `{name: fn}`: one call, then as many as take about
  `seconds` (1 to 50)."""
  out = {}
  for name, fn in calls.items():
    t = timed(fn, 1)
    out[name] = t + timed(fn, max(1, min(50, round(seconds / max(t[0], 1e-6)))))
  return out


def next_time(times, thread, poll: float = 1.0) -> float:
  """The next step time from `times` (a queue) filled by `thread`; raises if the thread has died."""
  import queue
  while True:
    try:
      return times.get(timeout=poll)
    except queue.Empty:
      if not thread.is_alive():
        raise RuntimeError('the training thread stopped (its traceback is in the worker log).')
