"""Tunix peer: its Llama3 model (flax nnx), its KV-cache sampler and its GRPO learner.

Runs in `benchmarks/.venvs/tunix` (see `benchmarks.envs`). The weights are
`benchmarks.common.init_weights` mapped to Tunix's layout: `q_proj [D, H, hd]`,
`k_proj, v_proj [D, KV, hd]` (from the qkv columns), `o_proj [H, hd, D]`, `gate_proj, up_proj
[D, F]` (from gate_up), `down_proj [F, D]`, `lm_head [D, V]`. Tunix's attention applies RoPE
with theta = 1e6 whatever its config says, so every framework uses theta = 1e6 (common.Shape).
Its sampler takes strings: a word-level tokenizer maps `"t17"` to id 17.
"""
from __future__ import annotations

from benchmarks import common

PIN = common.pin_threads()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402


class WordTokenizer:
  """`"t3 t17"` <-> `[3, 17]`; no BOS (bos_id 0 is falsy for Tunix), pad 0, EOS one past the vocabulary."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text, **_) -> list[int]:
    text = text.item() if isinstance(text, np.ndarray) else text  # the learner passes numpy strings
    return [int(w[1:]) for w in str(text).split()]

  def decode(self, ids, **_) -> str:
    return ' '.join(f't{int(i)}' for i in ids)

  def bos_id(self) -> int:
    return 0

  def eos_id(self) -> int:
    return self.vocab  # never sampled: fixed-length generation

  def pad_id(self) -> int:
    return 0


def text(row) -> str:
  return ' '.join(f't{int(i)}' for i in row)


def build(s: common.Shape, w: dict[str, np.ndarray]) -> llama3.Llama3:
  cfg = llama3.ModelConfig(num_layers=s.layers, vocab_size=s.vocab, embed_dim=s.width, hidden_dim=s.mlp,
                           num_heads=s.heads, head_dim=s.head_dim, num_kv_heads=s.kv_heads,
                           rope_theta=int(s.rope_theta), norm_eps=s.norm_eps)
  model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
  hd, h, kv, f, d = s.head_dim, s.heads, s.kv_heads, s.mlp, s.width
  j = lambda x: jnp.asarray(np.ascontiguousarray(x))
  model.embedder.input_embedding.value = j(w['backbone/embed/embedding'])
  for i, layer in enumerate(model.layers):
    p = f'backbone/layers_{i}'
    qkv = w[f'{p}/attn/qkv/kernel']
    layer.attn.q_proj.w.value = j(qkv[:, :h * hd].reshape(d, h, hd))
    layer.attn.k_proj.w.value = j(qkv[:, h * hd:(h + kv) * hd].reshape(d, kv, hd))
    layer.attn.v_proj.w.value = j(qkv[:, (h + kv) * hd:].reshape(d, kv, hd))
    layer.attn.o_proj.w.value = j(w[f'{p}/attn/out/kernel'].reshape(h, hd, d))
    gate_up = w[f'{p}/mlp/gate_up/kernel']
    layer.mlp.gate_proj.kernel.value = j(gate_up[:, :f])
    layer.mlp.up_proj.kernel.value = j(gate_up[:, f:])
    layer.mlp.down_proj.kernel.value = j(w[f'{p}/mlp/down/kernel'])
    layer.input_layernorm.w.value = j(w[f'{p}/attn_norm/scale'])
    layer.post_attention_layernorm.w.value = j(w[f'{p}/mlp_norm/scale'])
  model.final_norm.w.value = j(w['backbone/final_norm/scale'])
  model.lm_head.w.value = j(w['lm_head/kernel'])
  return model


def prompt_nll(model: llama3.Llama3, prompt: np.ndarray) -> float:
  """Mean next-token NLL of the prompts `[B, P]` under a causal no-cache forward pass, float32 dots."""
  b, p = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (b, p, p))
  with common.check_precision():
    logits, _ = model(jnp.asarray(prompt), positions, None, mask)
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return float(-jnp.take_along_axis(lp, jnp.asarray(prompt)[:, 1:, None], -1).mean())


class Worker:

  def __init__(self):
    self.run_once = None
    self.run_steps = None

  def setup_generate(self, size, rows, prompt_len, new_tokens, top_p=1.0, seed=0, **_):
    s = common.shape(size)
    model = build(s, common.init_weights(s, seed, lm_head=True))
    prompt = common.prompts(s, rows, prompt_len, seed + 200)
    check = [prompt_nll(model, prompt)]
    cache = sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=s.layers,
                                    num_kv_heads=s.kv_heads, head_dim=s.head_dim)
    tok = WordTokenizer(s.vocab)
    sampler = sampler_lib.Sampler(model, tok, cache)
    strings = [text(r) for r in prompt]
    counter = {'n': 0}

    def once():
      counter['n'] += 1
      out = sampler(strings, max_generation_steps=new_tokens, max_prompt_length=prompt_len, temperature=1.0,
                    top_p=top_p, top_k=None, seed=counter['n'], eos_tokens=[tok.eos_id()])
      lengths = {len(t) for t in out.tokens}
      if lengths != {new_tokens}:
        raise RuntimeError(f'Tunix sampler returned lengths {sorted(lengths)}, expected {new_tokens}.')

    t0 = time.perf_counter()
    once()
    self.run_once = once
    return {'compile_s': time.perf_counter() - t0, 'compile_note': 'first call (compile + one run)', 'check': check}

  def setup_grpo(self, size, prompts_per_step, group, prompt_len, new_tokens, beta, reward_token, seed=0, **_):
    """Tunix's GRPOLearner on an RLCluster (vanilla rollout, one CPU mesh), paced by its data iterator."""
    import queue
    import threading

    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    s = common.shape(size)
    w = common.init_weights(s, seed, lm_head=True)
    actor, reference = build(s, w), build(s, w)
    prompt = common.prompts(s, prompts_per_step, prompt_len, seed + 300)
    check = [prompt_nll(actor, prompt)]
    tok = WordTokenizer(s.vocab)
    # With jax 0.10, make_mesh defaults to Explicit axes, on which Tunix's first rollout fails.
    mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    o = common.OPTIM
    opt = optax.chain(optax.clip_by_global_norm(o['grad_clip']),
                      optax.adamw(o['lr'], b1=o['b1'], b2=o['b2'], eps=o['eps'], weight_decay=o['weight_decay']))
    training = rl_cluster_lib.RLTrainingConfig(actor_optimizer=opt, eval_every_n_steps=10 ** 9, max_steps=10 ** 6)
    rollout = base_rollout.RolloutConfig(max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len,
                                         kv_cache_size=prompt_len + new_tokens + 8, temperature=1.0, top_p=1.0,
                                         top_k=None, eos_tokens=[tok.eos_id()])
    roles = rl_cluster_lib.Role
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=tok,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh}, rollout_engine='vanilla',
            offload_to_cpu=False, training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=group, num_iterations=1, beta=beta, epsilon=0.2,
                                   loss_agg_mode='sequence-mean-token-mean')
    word = f't{int(reward_token)}'

    def count_reward(prompts, completions, **_):
      lengths = {len(c.split()) for c in completions}
      if lengths != {new_tokens}:
        raise RuntimeError(f'Tunix completions have lengths {sorted(lengths)}, expected {new_tokens}.')
      return [float(c.split().count(word)) for c in completions]

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[count_reward])
    texts = [text(r) for r in prompt]
    permits, times = threading.Semaphore(0), queue.Queue()

    def batches():
      # The learner asks for batch i + 1 when it is done with batch i: the gap is one iteration.
      last = None
      while True:
        if last is not None:
          times.put(time.perf_counter() - last)
        permits.acquire()
        last = time.perf_counter()
        yield {'prompts': np.array(texts)}  # one leaf: the learner tree-maps np.repeat over the batch

    worker = threading.Thread(target=learner.train, args=(batches(),), daemon=True)
    worker.start()

    def run(steps):
      for _ in range(steps):
        permits.release()
      return [common.next_time(times, worker) for _ in range(steps)]

    permits.release()  # the learner reads one batch ahead of the first step to size its batches
    t0 = time.perf_counter()
    run(1)
    self.run_steps = run
    self.run_once = lambda: run(1)
    return {'compile_s': time.perf_counter() - t0, 'compile_note': 'first iteration (compile + one run)',
            'check': check, 'peer': 'GRPOLearner'}

  def setup(self, workload, **kw):
    common.check_cpus()
    res = getattr(self, f'setup_{workload}')(**kw)
    self.run_once()
    import tunix  # noqa
    from importlib import metadata
    peer = res.pop('peer', None)
    res['framework'] = ' '.join(filter(None, ['Tunix', metadata.version('google-tunix'), peer,
                                              f'(jax {jax.__version__})']))
    res['device'] = common.jax_device()
    res['cpus'] = PIN['cpus']
    return res

  def time(self, steps):
    if self.run_steps is not None:  # paced learner: times measured between its batch requests
      return {'times': self.run_steps(steps)}
    return {'times': common.timed(self.run_once, steps)}


if __name__ == '__main__':
  w = Worker()
  common.serve({'setup': w.setup, 'time': w.time})
