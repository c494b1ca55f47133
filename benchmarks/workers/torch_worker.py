"""PyTorch peer: transformers Llama models, TRL's Bradley–Terry loss and GRPO trainer.

Runs in `benchmarks/.venvs/torch` (see `benchmarks.envs`). The weights are
`benchmarks.common.init_weights` mapped to the Hugging Face Llama layout: `qkv [D, (H+2KV) hd]`
splits into `q_proj, k_proj, v_proj` (transposed), `gate_up [D, 2F]` into `gate_proj,
up_proj`, kernels `[in, out]` become weights `[out, in]`.
"""
from __future__ import annotations

from benchmarks import common

PIN = common.pin_threads()

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(common.THREADS)
torch.set_num_interop_threads(1)


def hf_config(s: common.Shape, num_labels: int = 1) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=s.vocab, hidden_size=s.width, intermediate_size=s.mlp, num_hidden_layers=s.layers,
      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
      max_position_embeddings=s.max_len, rms_norm_eps=s.norm_eps,
      rope_parameters={'rope_type': 'default', 'rope_theta': s.rope_theta}, attention_bias=False, mlp_bias=False,
      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None, num_labels=num_labels,
      dtype='float32')


def hf_state_dict(s: common.Shape, w: dict[str, np.ndarray], prefix: str = 'model.') -> dict[str, torch.Tensor]:
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
  hd, h, kv, f = s.head_dim, s.heads, s.kv_heads, s.mlp
  sd = {f'{prefix}embed_tokens.weight': t(w['backbone/embed/embedding']),
        f'{prefix}norm.weight': t(w['backbone/final_norm/scale'])}
  for i in range(s.layers):
    src, dst = f'backbone/layers_{i}', f'{prefix}layers.{i}'
    qkv = w[f'{src}/attn/qkv/kernel']
    sd[f'{dst}.self_attn.q_proj.weight'] = t(qkv[:, :h * hd].T)
    sd[f'{dst}.self_attn.k_proj.weight'] = t(qkv[:, h * hd:(h + kv) * hd].T)
    sd[f'{dst}.self_attn.v_proj.weight'] = t(qkv[:, (h + kv) * hd:].T)
    sd[f'{dst}.self_attn.o_proj.weight'] = t(w[f'{src}/attn/out/kernel'].T)
    gate_up = w[f'{src}/mlp/gate_up/kernel']
    sd[f'{dst}.mlp.gate_proj.weight'] = t(gate_up[:, :f].T)
    sd[f'{dst}.mlp.up_proj.weight'] = t(gate_up[:, f:].T)
    sd[f'{dst}.mlp.down_proj.weight'] = t(w[f'{src}/mlp/down/kernel'].T)
    sd[f'{dst}.input_layernorm.weight'] = t(w[f'{src}/attn_norm/scale'])
    sd[f'{dst}.post_attention_layernorm.weight'] = t(w[f'{src}/mlp_norm/scale'])
  if 'lm_head/kernel' in w:
    sd['lm_head.weight'] = t(w['lm_head/kernel'].T)
  if 'reward_head/kernel' in w:
    sd['score.weight'] = t(w['reward_head/kernel'].T)
  return sd


def load(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if 'rotary' not in k]
  if missing or unexpected:
    raise RuntimeError(f'weight mapping: missing {missing}, unexpected {unexpected}.')
  return model


def adamw(params) -> torch.optim.Optimizer:
  o = common.OPTIM
  return torch.optim.AdamW(params, lr=o['lr'], betas=(o['b1'], o['b2']), eps=o['eps'],
                           weight_decay=o['weight_decay'])


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
  """TRL RewardTrainer's Bradley–Terry loss: `-logsigmoid(r_chosen - r_rejected).mean()` (per head)."""
  return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean(0)


class Worker:

  def __init__(self):
    self.run_once = None
    self.run_steps = None

  # --------------------------------------------------------------------------- RM step
  def setup_rm(self, size, pairs, seq_len, members=1, kind='full', seed=0, **_):
    s = common.shape(size)
    heads = 1 if kind == 'full' else members
    n_models = members if kind == 'full' else 1
    models, opts = [], []
    for k in range(n_models):
      w = common.init_weights(s, seed + k, lm_head=False, reward_heads=heads)
      m = load(transformers.LlamaForSequenceClassification(hf_config(s, heads)), hf_state_dict(s, w))
      m.train()
      models.append(m)
      opts.append(adamw(m.parameters()))
    data = common.pair_batch(s, pairs, seq_len, seed + 100)
    ids = torch.from_numpy(np.concatenate([data['chosen'], data['rejected']]).astype(np.int64))
    attn = torch.ones_like(ids)

    def step():
      losses = []
      for m, opt in zip(models, opts):  # one model after another
        scores = m(input_ids=ids, attention_mask=attn).logits  # [2B, heads]
        per_head = bt_loss(scores[:pairs], scores[pairs:])
        loss = per_head.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), common.OPTIM['grad_clip'])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(per_head.detach())
      return float(torch.cat(losses).mean())

    t0 = time.perf_counter()
    losses = [step(), step()]
    first_s = time.perf_counter() - t0
    self.run_once = step
    return {'compile_s': None, 'first_steps_s': first_s, 'check': losses}

  # --------------------------------------------------------------------------- generation
  def setup_generate(self, size, rows, prompt_len, new_tokens, top_p=1.0, seed=0, **_):
    s = common.shape(size)
    w = common.init_weights(s, seed, lm_head=True)
    model = load(transformers.LlamaForCausalLM(hf_config(s)), hf_state_dict(s, w)).eval()
    prompt = torch.from_numpy(common.prompts(s, rows, prompt_len, seed + 200).astype(np.int64))
    attn = torch.ones_like(prompt)
    with torch.inference_mode():
      logits = model(input_ids=prompt, attention_mask=attn).logits
      lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, prompt[:, 1:, None])[..., 0]
    check = [float(-lp.mean())]
    gen = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=top_p,
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                        pad_token_id=0, eos_token_id=None, bos_token_id=None)

    def once():
      with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=attn, generation_config=gen)
      if out.shape != (rows, prompt_len + new_tokens):
        raise RuntimeError(f'generate returned {tuple(out.shape)}, expected {(rows, prompt_len + new_tokens)}.')

    t0 = time.perf_counter()
    once()
    self.run_once = once
    return {'compile_s': None, 'first_steps_s': time.perf_counter() - t0, 'check': check}

  # --------------------------------------------------------------------------- GRPO iteration
  def setup_grpo(self, size, prompts_per_step, group, prompt_len, new_tokens, beta, reward_token, seed=0, **_):
    """TRL's GRPOTrainer, driven by `trainer.train()` in a thread that a callback paces step by step."""
    import queue
    import tempfile
    import threading

    import datasets
    import tokenizers
    import trl

    s = common.shape(size)
    w = common.init_weights(s, seed, lm_head=True)
    model = load(transformers.LlamaForCausalLM(hf_config(s)), hf_state_dict(s, w))
    prompt = common.prompts(s, prompts_per_step, prompt_len, seed + 300)
    with torch.inference_mode():
      ids = torch.from_numpy(prompt.astype(np.int64))
      lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    check = [float(-lp.mean())]
    # Word-level tokenizer "t17" -> 17; EOS is one id past the model's vocabulary, so it is never
    # sampled and every completion has exactly `new_tokens` tokens.
    vocab = {f't{i}': i for i in range(s.vocab)}
    vocab['<eos>'] = s.vocab
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='t0'))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='t0', eos_token='<eos>')
    folder = tempfile.mkdtemp(prefix='bench-trl-')
    model.config.eos_token_id = s.vocab
    model.generation_config.eos_token_id = s.vocab
    model.save_pretrained(folder)  # TRL builds its reference model from the model's path
    tok.save_pretrained(folder)
    texts = [' '.join(f't{int(i)}' for i in row) for row in prompt]
    data = datasets.Dataset.from_dict({'prompt': texts * 2000})
    reward_id = int(reward_token)

    def count_reward(completions, completion_ids, **_):
      lengths = {len(c) for c in completion_ids}
      if lengths != {new_tokens}:
        raise RuntimeError(f'TRL completions have lengths {sorted(lengths)}, expected {new_tokens}.')
      return [float(sum(1 for t in c if t == reward_id)) for c in completion_ids]

    o = common.OPTIM
    args = trl.GRPOConfig(
        output_dir=folder, per_device_train_batch_size=prompts_per_step * group, num_generations=group,
        max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=beta, epsilon=0.2,
        loss_type='grpo', scale_rewards='group', num_iterations=1, learning_rate=o['lr'], adam_beta1=o['b1'],
        adam_beta2=o['b2'], adam_epsilon=o['eps'], weight_decay=o['weight_decay'], max_grad_norm=o['grad_clip'],
        lr_scheduler_type='constant', warmup_steps=0, bf16=False, fp16=False, gradient_checkpointing=False,
        logging_strategy='no', report_to='none', save_strategy='no', max_steps=10 ** 6, disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, seed=seed, log_completions=False, shuffle_dataset=False)
    permits, times = threading.Semaphore(0), queue.Queue()

    class Pace(transformers.TrainerCallback):

      def on_step_begin(self, *a, **k):
        permits.acquire()
        self.t0 = time.perf_counter()

      def on_step_end(self, *a, **k):
        times.put(time.perf_counter() - self.t0)

    trainer = trl.GRPOTrainer(model=folder, reward_funcs=count_reward, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[Pace()])
    worker = threading.Thread(target=trainer.train, daemon=True)
    worker.start()

    def run(steps):
      for _ in range(steps):
        permits.release()
      return [common.next_time(times, worker) for _ in range(steps)]

    t0 = time.perf_counter()
    run(1)
    self.run_steps = run
    self.run_once = lambda: run(1)
    return {'compile_s': None, 'first_steps_s': time.perf_counter() - t0, 'check': check,
            'peer': f'TRL {trl.__version__} GRPOTrainer'}

  def setup(self, workload, **kw):
    common.check_cpus()
    if torch.get_num_threads() != common.THREADS:
      raise RuntimeError(f'torch uses {torch.get_num_threads()} threads, expected {common.THREADS}.')
    res = getattr(self, f'setup_{workload}')(**kw)
    self.run_once()
    res['framework'] = f'PyTorch {torch.__version__}, transformers {transformers.__version__}'
    if 'peer' in res:
      res['framework'] = f"{res.pop('peer')}, {res['framework']}"
    res['device'] = {'platform': 'cpu', 'kind': 'cpu'}  # this worker never moves its models to an accelerator
    res['cpus'] = PIN['cpus']
    return res

  def time(self, steps):
    if self.run_steps is not None:  # paced trainer: times measured inside, by its callback
      return {'times': self.run_steps(steps)}
    return {'times': common.timed(self.run_once, steps)}

  def setup_dots(self, shapes):
    """fp32 dots `{name: [M, K, N]}` for `time_dots` (`benchmarks.dots`)."""
    common.check_cpus()
    g = torch.Generator().manual_seed(0)
    self.dots = {}
    for name, (m, k, n) in shapes.items():
      a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
      self.dots[name] = lambda a=a, b=b: torch.mm(a, b)
      self.dots[name]()
    return {'framework': f'PyTorch {torch.__version__}'}

  def time_dots(self, seconds=0.3):
    """`{name: [seconds per dot]}`, each dot repeated for about `seconds`."""
    return {'times': common.time_calls(self.dots, seconds)}


if __name__ == '__main__':
  w = Worker()
  common.serve({'setup': w.setup, 'time': w.time, 'setup_dots': w.setup_dots, 'time_dots': w.time_dots})
