"""rmjax worker: the RM step, generation, the GRPO iteration and XLA dot baselines.

Run by `benchmarks.run` as `python -m benchmarks.workers.rmjax_worker` (the protocol is
`benchmarks.common.serve`): `setup(**workload)` builds and compiles, `time(steps)` times.
"""
from __future__ import annotations

from benchmarks import common

PIN = common.pin_threads()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from rmjax import objectives  # noqa: E402
from rmjax.models import ensemble, sampling  # noqa: E402
from rmjax.models.config import get_size  # noqa: E402
from rmjax.models.reward_model import RewardModel  # noqa: E402
from rmjax.rl import iteration as rl  # noqa: E402
from rmjax.train import accumulate, optim, rm_trainer  # noqa: E402
from rmjax.train import state as state_lib  # noqa: E402


def nest(flat: dict[str, np.ndarray]) -> dict:
  """`{'a/b/c': x}` -> `{'a': {'b': {'c': x}}}` with jnp arrays."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  return tree


def model_config(size: str, **overrides):
  s = common.shape(size)
  c = get_size(size, rope_theta=s.rope_theta, **overrides)
  expected = (s.vocab, s.width, s.mlp, s.layers, s.heads, s.kv_heads, s.norm_eps, s.rope_theta)
  got = (c.vocab_size, c.width, c.mlp_width, c.num_layers, c.num_heads, c.num_kv_heads, c.norm_eps, c.rope_theta)
  if got != expected:
    raise ValueError(f'rmjax size {size!r} {got} differs from the benchmark shape {expected}.')
  return c


def optimizer(total_steps: int = 1):
  o = common.OPTIM
  cfg = ml_collections.ConfigDict(dict(name='adamw', lr=o['lr'], b1=o['b1'], b2=o['b2'], eps=o['eps'],
                                       weight_decay=o['weight_decay'], grad_clip=o['grad_clip'],
                                       schedule='constant', warmup_steps=0, final_lr_ratio=1.0))
  return optim.make_optimizer(cfg, total_steps)


class Worker:
  """Holds one workload's compiled function and its state between `time` calls."""

  def __init__(self):
    self.run_once = None
    self.program = None  # the timed program last compiled (`benchmarks.profile` reads its HLO)
    self.runs = {}
    self.dots = {}
    # jax's default fp32 dots are float32 on the CPU, TF32 on NVIDIA GPUs and bf16 passes on TPUs.
    self.float32_by_default = jax.default_backend() == 'cpu'

  def _compile(self, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile() if not hasattr(fn, 'lower') else fn.lower(*args).compile()
    self.program = compiled
    return compiled, time.perf_counter() - t0

  def _check_program(self, fn, compiled, *args):
    """The program whose values are compared with the peers': the timed `compiled` itself where the default fp32
    dots are float32, else `fn` compiled again under `common.check_precision`."""
    if self.float32_by_default:
      return compiled
    with common.check_precision():
      return jax.jit(fn).lower(*args).compile()

  # --------------------------------------------------------------------------- RM step
  def setup_rm(self, size, pairs, seq_len, members=1, kind='full', seed=0, seq_scale=1, grad_accum_steps=1, **_):
    cfg = model_config(size, max_len=max(1024, seq_len))
    s = common.shape(size)
    rm = RewardModel(cfg, num_members=members, kind=kind)
    if kind == 'full':
      trees = [nest(common.init_weights(s, seed + k, lm_head=False, reward_heads=1)) for k in range(members)]
      params = ensemble.stack(trees)
      opt = rm_trainer.per_member(optimizer())
    else:
      params = nest(common.init_weights(s, seed, lm_head=False, reward_heads=members))
      opt = optimizer()
    state = state_lib.create(params, opt, jax.random.key(0))
    data = common.pair_batch(s, pairs, seq_len, seed + 100)
    batch = {'chosen_tokens': data['chosen'], 'rejected_tokens': data['rejected'],
             'chosen_mask': np.ones_like(data['chosen'], bool), 'rejected_mask': np.ones_like(data['rejected'], bool),
             'weight': np.ones(pairs, np.float32), 'index': np.arange(pairs, dtype=np.int32)}
    batch = jax.device_put(batch)
    step = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), grad_accum_steps=grad_accum_steps)
    compiled, compile_s = self._compile(step, state, batch)
    check_step = self._check_program(step, compiled, state, batch)
    losses = []
    for _ in range(2):  # loss on the initial weights, then after one update
      state, m = check_step(state, batch)
      losses.append(float(m['loss']))
    holder = {'state': state}

    def once():
      holder['state'], m = compiled(holder['state'], batch)
      m['loss'].block_until_ready()

    self.run_once = once
    micro = (accumulate.auto_steps(pairs, 2 * seq_len) if grad_accum_steps == accumulate.AUTO
             else grad_accum_steps)
    return {'compile_s': compile_s, 'check': losses, 'framework': f'rmjax (jax {jax.__version__})',
            'microbatches': micro}

  # --------------------------------------------------------------------------- generation
  def setup_generate(self, size, rows, prompt_len, new_tokens, top_p=1.0, seed=0, **_):
    cfg = model_config(size)
    s = common.shape(size)
    params = nest(common.init_weights(s, seed, lm_head=True))
    prompt = jnp.asarray(common.prompts(s, rows, prompt_len, seed + 200))
    mask = jnp.ones_like(prompt, bool)
    with common.check_precision():
      lp = sampling.token_logprobs(params, cfg, prompt, mask)
    check = [float(-lp[:, 1:].mean())]
    fn = jax.jit(lambda p, t, m, k: sampling.sample(p, cfg, t, m, k, max_new_tokens=new_tokens, temperature=1.0,
                                                    top_p=top_p).tokens)
    key = jax.random.key(seed)
    compiled, compile_s = self._compile(fn, params, prompt, mask, key)
    out = compiled(params, prompt, mask, key)
    if out.shape != (rows, new_tokens):
      raise RuntimeError(f'rmjax sampler returned {out.shape}, expected {(rows, new_tokens)}.')
    counter = {'n': 0}

    def once():
      counter['n'] += 1
      compiled(params, prompt, mask, jax.random.fold_in(key, counter['n'])).block_until_ready()

    self.run_once = once
    return {'compile_s': compile_s, 'check': check, 'framework': f'rmjax (jax {jax.__version__})'}

  # --------------------------------------------------------------------------- GRPO iteration
  def setup_grpo(self, size, prompts_per_step, group, prompt_len, new_tokens, beta, reward_token, seed=0,
                 scorer_members=0, **_):
    cfg = model_config(size, max_len=max(1024, prompt_len + new_tokens))
    s = common.shape(size)
    policy = nest(common.init_weights(s, seed, lm_head=True))
    section = ml_collections.ConfigDict({
        'reward': 'mean', 'advantage': 'grpo', 'grpo': {'group_size': group},
        'loss': 'ppo_clip,kl_k3', 'kl_k3': {'coef': beta}, 'reduction': 'seq_mean_token_mean'})
    settings = rl.Settings(group_size=group, max_new_tokens=new_tokens, temperature=1.0, epochs=1, minibatches=1)
    if scorer_members:  # a full reward-model ensemble of the policy's shape scores the rollouts
      rm = RewardModel(cfg, num_members=scorer_members)
      reward_params = ensemble.stack([nest(common.init_weights(s, seed + 50 + k, lm_head=False, reward_heads=1))
                                      for k in range(scorer_members)])
      scorer = rm.apply
    else:  # the toy reward of the peers: count of `reward_token`
      reward_params = ()
      scorer = lambda _, tokens, mask: ((tokens == reward_token) & mask).sum(-1).astype(jnp.float32)[None]
    opt = optimizer()
    objective = objectives.build(section)
    it = rl.make_iteration(cfg, section, settings, scorer, opt)
    state = rl.init_state(rl.init_params(jax.random.key(1), policy, None), opt, jax.random.key(seed), objective)
    frozen = rl.Frozen(ref_params=policy, reward_params=reward_params)
    prompt = common.prompts(s, prompts_per_step, prompt_len, seed + 300)
    batch = jax.device_put({'prompt_tokens': prompt, 'prompt_mask': np.ones_like(prompt, bool)})
    with common.check_precision():
      lp = sampling.token_logprobs(policy, cfg, jnp.asarray(prompt), jnp.ones_like(prompt, bool))
    check = [float(-lp[:, 1:].mean())]
    compiled, compile_s = self._compile(it, state, frozen, batch)
    state, m = compiled(state, frozen, batch)
    check.append(float(m['ratio_dev_first']))
    holder = {'state': state}

    def once():
      holder['state'], m = compiled(holder['state'], frozen, batch)
      m['loss'].block_until_ready()

    self.run_once = once
    return {'compile_s': compile_s, 'check': check, 'framework': f'rmjax (jax {jax.__version__})'}

  # --------------------------------------------------------------------------- dot baselines
  def setup_dot(self, m, k, n, **_):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    compiled, compile_s = self._compile(jnp.dot, a, b)
    compiled(a, b).block_until_ready()
    self.run_once = lambda: compiled(a, b).block_until_ready()
    return {'compile_s': compile_s, 'check': [], 'framework': f'XLA dot (jax {jax.__version__})'}

  def setup_dots(self, shapes):
    """Compiles fp32 dots `{name: [M, K, N]}` for `time_dots`, timed next to the workload (or alone, `benchmarks.dots`)."""
    common.check_cpus()
    rng = np.random.default_rng(0)
    for name, (m, k, n) in shapes.items():
      a = jnp.asarray(rng.standard_normal((m, k), np.float32))
      b = jnp.asarray(rng.standard_normal((k, n), np.float32))
      compiled = jax.jit(jnp.dot).lower(a, b).compile()
      compiled(a, b).block_until_ready()
      self.dots[name] = (lambda c=compiled, a=a, b=b: c(a, b).block_until_ready())
    return {'framework': f'XLA (jax {jax.__version__})'}

  def time_dots(self, seconds=0.3):
    """`{name: [seconds per dot]}`, each dot repeated for about `seconds`."""
    return {'times': common.time_calls(self.dots, seconds)}

  def setup(self, workload, key=None, **kw):
    """Builds, compiles and warms up `workload`; with `key`, keeps it beside earlier ones for `time(key=...)`."""
    common.check_cpus()
    res = getattr(self, f'setup_{workload}')(**kw)
    self.run_once()  # one more warm-up call, excluded
    if key is not None:
      self.runs[key] = self.run_once
    res['device'] = common.jax_device()
    res['cpus'] = PIN['cpus']
    return res

  def time(self, steps, key=None):
    return {'times': common.timed(self.run_once if key is None else self.runs[key], steps)}


if __name__ == '__main__':
  w = Worker()
  common.serve({'setup': w.setup, 'time': w.time, 'setup_dots': w.setup_dots, 'time_dots': w.time_dots})
