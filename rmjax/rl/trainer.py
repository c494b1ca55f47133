"""The RL trainer job (`configs/ppo.py`, `rloo.py`, `grpo.py`): config -> models -> `loop.run`.

Models, each from a self-describing checkpoint given by path (`rmjax.train.checkpoint.load`):
  config.policy.path     a causal-LM checkpoint (`kind='causal_lm'`): the initial policy and
                         the frozen reference; '' = a fresh `config.policy.model` from the seed.
  config.reward.path     a reward-model checkpoint (`kind='reward_model'`, its `normalization`
                         used by the aggregations), or only its members `config.reward.members`
                         (e.g. '0': one member of an ensemble as a single proxy); '' = the toy
                         reward "count of token `config.reward.toy_token`" (smoke runs, tests).
  config.gold.path       an optional gold reward model ('' = none).
  config.reward.ref_samples  an optional `.npy` of `[num_prompts + num_eval, N]` reference
                         rewards per prompt id, for transforms against r_ref(x) (`log_sigmoid`,
                         `par` with ref='quantile'; `load_ref_samples`).

Prompts: `config.data.num_prompts` training and `config.data.num_eval` held-out prompts of the
built-in synthetic language (`rmjax.data.Grammar`, seed `config.data.seed`), byte-tokenized and
left-padded. Iteration s reads the training prompts `s·P .. s·P + P − 1` (mod the set), so the
data position is the step and resumes with it. Every `train.eval_every` iterations the held-out
prompts are rolled out (no update) and logged under `eval/`; at every checkpoint
`workdir/rollouts/<step>.jsonl` receives those rollouts (prompt id, texts, tokens, per-member and
gold scores). Everything the next iteration reads (params, optimizer, controller and whitening
state, rng, step) is the checkpointed `RLState` (`../shared/PITFALLS.md` #13).

Tokenizers: prompts are encoded with the policy checkpoint's tokenizer (the byte tokenizer for a
fresh policy). A reward or gold model saved with another tokenizer scores re-tokenized rows
(`rmjax.rl.retokenize`: decoded, encoded again with its own tokenizer on the host inside the
compiled iteration, `../shared/PITFALLS.md` #14), `config.reward.seq_len` / `config.gold.seq_len`
tokens wide (0: as wide as the policy's rows, `data.prompt_len + rl.max_new_tokens`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.data.synthetic_language import Grammar
from rmjax.data.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_dict
from rmjax.models import transformer
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import RewardModel
from rmjax.rl import iteration as it
from rmjax.rl import retokenize
from rmjax.train import accumulate, checkpoint, loop, optim
from rmjax.train import state as state_lib


POLICY_KINDS = ('causal_lm', 'rl_policy')


def load_policy(path: str) -> tuple[Any, ModelConfig, dict]:
  """`(LM params, ModelConfig, tokenizer dict)` of a policy checkpoint folder (a step folder or a
  run's `checkpoints/`, newest step): a causal LM (`kind='causal_lm'`: pretraining, SFT, DPO) or
  an RL run's policy (`kind='rl_policy'`: `params['policy']` of its `RLState`)."""
  state, meta = checkpoint.load(path)
  kind = meta.get('kind')
  if kind not in POLICY_KINDS:
    raise config_lib.ConfigError(f'{path}: expected a policy checkpoint (kind one of {POLICY_KINDS}), found '
                                 f'kind={kind!r}.')
  params = state['params']['policy'] if kind == 'rl_policy' else state['params']
  return jax.tree.map(jnp.asarray, params), ModelConfig.from_dict(meta['model']), meta.get('tokenizer', {})


def load_reward_model(path: str) -> tuple[RewardModel, Any, objectives.RewardStats | None, dict]:
  """`(RewardModel, params, stats or None, tokenizer dict)` of a reward-model checkpoint folder."""
  state, meta = checkpoint.load(path)
  if meta.get('kind') != 'reward_model':
    raise config_lib.ConfigError(f'{path}: expected a reward_model checkpoint, found kind={meta.get("kind")!r}.')
  rm = RewardModel.from_dict(meta['model'])
  norm = meta.get('normalization')
  stats = None if norm is None else objectives.RewardStats(jnp.asarray(norm['mean'], jnp.float32),
                                                           jnp.asarray(norm['std'], jnp.float32))
  return rm, jax.tree.map(jnp.asarray, state['params']), stats, meta.get('tokenizer', {})


def select_members(rm: RewardModel, params, stats: objectives.RewardStats | None, members: str
                   ) -> tuple[Any, Any, objectives.RewardStats | None]:
  """`(scorer, params, stats)` of the members listed in `members` ('0' or '0,2'; '' = all) of a
  reward model: a full ensemble's stacked params and stats are sliced (only those members run), a
  multi-head model's `[K, B]` scores are indexed."""
  if not str(members).strip():
    return rm.apply, params, stats
  try:
    idx = [int(i) for i in str(members).split(',')]
  except ValueError:
    raise config_lib.ConfigError(f'config.reward.members={members!r}: give comma-separated member indices.') from None
  bad = [i for i in idx if not 0 <= i < rm.num_members]
  if bad or len(set(idx)) != len(idx):
    raise config_lib.ConfigError(f'config.reward.members={members!r}: indices must be distinct and in '
                                 f'0..{rm.num_members - 1} (the checkpoint has {rm.num_members} members).')
  sel = np.asarray(idx)
  if stats is not None:
    stats = objectives.RewardStats(stats.mean[sel], stats.std[sel])
  if rm.kind == 'full':
    return RewardModel(rm.config, len(idx), 'full').apply, jax.tree.map(lambda x: x[sel], params), stats
  return (lambda p, t, m: rm.apply(p, t, m)[sel]), params, stats


def token_count_scorer(token: int):
  """The toy scorer: `[1, B]` number of `token` among the real tokens of each row."""
  def scorer(params, tokens, mask):
    del params
    return ((tokens == token) & mask).sum(-1).astype(jnp.float32)[None]
  return scorer


def left_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads (and left-truncates) id lists to `[N, width]` tokens and mask."""
  tokens, mask = np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    r = r[-width:]
    tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
  return tokens, mask


class PromptBatches:
  """`batches[s]`: prompts `s·P ..` of a fixed set (wrapping), as numpy `prompt_tokens/mask/ids`."""

  def __init__(self, tokens: np.ndarray, mask: np.ndarray, per_batch: int):
    if per_batch > len(tokens):
      raise config_lib.ConfigError(f'{per_batch} prompts per iteration exceed the {len(tokens)} prompts available.')
    self.tokens, self.mask, self.per_batch = tokens, mask, per_batch

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    ids = (step * self.per_batch + np.arange(self.per_batch)) % len(self.tokens)
    return dict(prompt_tokens=self.tokens[ids], prompt_mask=self.mask[ids], prompt_ids=ids.astype(np.int32))


def validate(config) -> None:
  """Checks the RL sections before anything compiles."""
  C = config_lib
  C.require_positive(config, 'rl.group_size', 'rl.max_new_tokens', 'rl.epochs', 'rl.minibatches', 'rl.temperature',
                     'data.prompts_per_iteration', 'data.num_prompts', 'data.num_eval', 'data.prompt_len',
                     'train.steps')
  if (config.data.prompts_per_iteration * config.rl.group_size) % config.rl.minibatches:
    raise C.ConfigError(f'config.data.prompts_per_iteration × rl.group_size = '
                        f'{config.data.prompts_per_iteration * config.rl.group_size} rows must be a multiple of '
                        f'rl.minibatches={config.rl.minibatches}.')
  accumulate.reject(config.train, 'RL trainer', 'rl.minibatches splits each iteration\'s updates')
  try:
    objectives.build(config.objective)
  except ValueError as e:
    raise C.ConfigError(f'config.objective: {e}') from e


def settings(config, tok) -> it.Settings:
  r = config.rl
  return it.Settings(group_size=int(r.group_size), max_new_tokens=int(r.max_new_tokens),
                     temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p), eos_id=tok.eos_id,
                     pad_id=tok.pad_id, epochs=int(r.epochs), minibatches=int(r.minibatches),
                     missing_eos_penalty=float(r.missing_eos_penalty) if r.missing_eos_penalty > 0 else None)


def reward_scorer(section, policy_tok: Tokenizer, prompt_len: int, max_new_tokens: int, *, normalized: bool = False):
  """`(scorer, params, stats)` of the reward-model checkpoint at `section.path` (its members
  `section.members`, when given: `select_members`).

  scorer(params, tokens, mask) -> [K, B] on the policy's rows: the model's `apply`, behind
  re-tokenization (`rmjax.rl.retokenize`, `section.seq_len` wide; 0 = `prompt_len +
  max_new_tokens`) when its checkpoint names another tokenizer than `policy_tok`. With
  `normalized`, scores are standardized by the checkpoint's normalization (as for the gold).
  """
  rm, params, stats, tok_dict = load_reward_model(section.path)
  scorer, params, stats = select_members(rm, params, stats, section.get('members', ''))
  if normalized and stats is not None:
    shift, scale, raw = stats.mean[:, None], stats.std[:, None], scorer
    scorer = lambda p, t, m: (raw(p, t, m) - shift) / scale
  if tok_dict:
    rm_tok = tokenizer_from_dict(tok_dict)
    if rm_tok != policy_tok:
      width = int(section.seq_len) if 'seq_len' in section and section.seq_len > 0 else prompt_len + max_new_tokens
      scorer = retokenize.retokenizing_scorer(scorer, policy_tok, rm_tok, prompt_len=prompt_len, width=width)
  return scorer, params, stats


def policy_tokenizer(tok_dict: dict) -> Tokenizer:
  """The tokenizer a policy checkpoint names (the byte tokenizer when it names none)."""
  return tokenizer_from_dict(tok_dict) if tok_dict else ByteTokenizer()


def write_rollouts(path: pathlib.Path, samples: it.Samples, prompt_ids: np.ndarray, prompt_len: int, tok) -> None:
  """One JSON line per rollout: prompt id, prompt and response text and tokens, per-member and gold scores."""
  s = jax.device_get(samples)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    for i in range(s.tokens.shape[0]):
      prompt = s.tokens[i, :prompt_len][s.mask[i, :prompt_len]]
      response = s.tokens[i, prompt_len:][s.mask[i, prompt_len:]]
      row = dict(prompt_id=int(prompt_ids[i]), prompt=tok.decode(prompt.tolist()), text=tok.decode(response.tolist()),
                 prompt_tokens=prompt.tolist(), tokens=response.tolist(), scores=s.scores[:, i].tolist(),
                 gold=None if s.gold is None else float(s.gold[i]))
      f.write(json.dumps(row) + '\n')


class Setup(NamedTuple):
  """What `build` makes of a config, shared by the single-run and the population jobs.

  base_params: the loaded policy's LM params, or None for a fresh policy (`fresh_policy(seed)`).
  """
  tok: Tokenizer
  policy_cfg: ModelConfig
  base_params: Any
  value_cfg: ModelConfig | None
  settings: it.Settings
  scorer: it.Scorer
  gold_scorer: it.Scorer | None
  reward_params: Any
  stats: objectives.RewardStats | None
  gold_params: Any
  ref_samples: np.ndarray | None
  batches: PromptBatches
  held_out: dict[str, np.ndarray]
  mesh: Any


def build(config) -> Setup:
  """Models (by path or fresh), scorers (re-tokenizing where needed), prompts and the mesh of `config`."""
  mesh = parallel.mesh_from_config(config.mesh)
  base_params = None
  if config.policy.path:
    base_params, policy_cfg, tok_dict = load_policy(config.policy.path)
    tok = policy_tokenizer(tok_dict)
  else:
    tok = ByteTokenizer()
    policy_cfg = config_lib.model_config(config.policy.model, vocab_size=tok.vocab_size)
  widths = (int(config.data.prompt_len), int(config.rl.max_new_tokens))
  if config.reward.path:
    scorer, reward_params, stats = reward_scorer(config.reward, tok, *widths)
  else:
    reward_params, stats, scorer = (), None, token_count_scorer(int(config.reward.toy_token))
  gold_scorer = gold_params = None
  if config.gold.path:
    gold_scorer, gold_params, _ = reward_scorer(config.gold, tok, *widths, normalized=True)
  grammar = Grammar.random(int(config.data.seed))
  texts = grammar.prompts(int(config.data.num_prompts) + int(config.data.num_eval), seed=int(config.data.seed))
  tokens, mask = left_pad([tok.encode(t) for t in texts], int(config.data.prompt_len), tok.pad_id)
  n_train = int(config.data.num_prompts)
  return Setup(
      tok=tok, policy_cfg=policy_cfg, base_params=base_params,
      value_cfg=policy_cfg if it.uses_value(config.objective) else None, settings=settings(config, tok),
      scorer=scorer, gold_scorer=gold_scorer, reward_params=reward_params, stats=stats, gold_params=gold_params,
      ref_samples=load_ref_samples(config.reward.get('ref_samples', ''), len(texts)),
      batches=PromptBatches(tokens[:n_train], mask[:n_train], int(config.data.prompts_per_iteration)),
      held_out=dict(prompt_tokens=tokens[n_train:], prompt_mask=mask[n_train:],
                    prompt_ids=np.arange(n_train, len(texts), dtype=np.int32)),
      mesh=mesh)


def load_ref_samples(path: str, num_prompts: int) -> np.ndarray | None:
  """`[P_all, N]` float32 reference rewards from the `.npy` file at `path` (row i: prompt id i,
  training prompts then held-out ones), or None for ''."""
  if not path:
    return None
  try:
    samples = np.load(path).astype(np.float32)
  except OSError as e:
    raise config_lib.ConfigError(f'config.reward.ref_samples={path!r}: cannot read it ({e}).') from None
  if samples.ndim != 2 or samples.shape[0] != num_prompts:
    raise config_lib.ConfigError(f'config.reward.ref_samples={path!r}: expected [{num_prompts}, N] (one row per '
                                 f'prompt id: data.num_prompts + data.num_eval), found {list(samples.shape)}.')
  return samples


def frozen_models(setup: Setup, ref_params) -> it.Frozen:
  """The iteration's frozen arrays: `ref_params` as the reference, the setup's reward and gold."""
  return it.Frozen(ref_params=ref_params, reward_params=setup.reward_params, stats=setup.stats,
                   gold_params=setup.gold_params,
                   ref_samples=None if setup.ref_samples is None else jnp.asarray(setup.ref_samples))


def total_updates(config) -> int:
  """Optimizer steps of a run: iterations × epochs × minibatches (the schedules' length)."""
  return int(config.train.steps) * int(config.rl.epochs) * int(config.rl.minibatches)


def initial_policy(setup: Setup, seed: int | jax.Array) -> Any:
  """The run's initial policy (and frozen reference): the loaded one, else a fresh one from `seed`."""
  if setup.base_params is not None:
    return setup.base_params
  return transformer.init_lm(jax.random.fold_in(jax.random.key(seed), 1), setup.policy_cfg)


def init_run_state(setup: Setup, policy_params, optimizer, objective, seed: int | jax.Array) -> it.RLState:
  """The `RLState` at step 0 of the run with `seed`: rng `fold_in(key(seed), 3)`, value model from
  `fold_in(key(seed), 2)` (its backbone the policy's)."""
  key = jax.random.key(seed)
  params = it.init_params(jax.random.fold_in(key, 2), policy_params, setup.value_cfg,
                          None if setup.value_cfg is None else policy_params['backbone'])
  return it.init_state(params, optimizer, jax.random.fold_in(key, 3), objective)


def eval_key(seed: int | jax.Array) -> jax.Array:
  """The key of the held-out rollouts of the run with `seed` (the same at every evaluation)."""
  return jax.random.fold_in(jax.random.key(seed), 4)


def rollout_prompt_ids(setup: Setup) -> np.ndarray:
  return np.repeat(setup.held_out['prompt_ids'], setup.settings.group_size)


def once_per_step(step_of):
  """Decorator: `fn(state)` computed once per step (`step_of(state)`), so the loop's evaluation and
  the checkpoint's rollouts at one step share one held-out rollout."""
  def decorate(fn):
    last = {}

    def wrapped(state):
      step = int(jax.device_get(step_of(state)))
      if last.get('step') != step:
        last.update(step=step, out=fn(state))
      return last['out']
    return wrapped
  return decorate


def place_frozen(frozen: it.Frozen, mesh, *, ref_population: bool = False) -> it.Frozen:
  """The frozen models on `mesh`: reference, reward and gold params sharded like a policy's
  (by logical axes), the normalization statistics replicated. ref_population: the reference is
  stacked per population member `[P, ...]` (`rmjax.rl.population`)."""
  place = lambda p, population=False: (state_lib.place_params(p, mesh, population=population)
                                       if jax.tree.leaves(p) else p)
  replicate = lambda x: None if x is None else jax.device_put(x, parallel.replicated(mesh))
  return it.Frozen(ref_params=place(frozen.ref_params, ref_population), reward_params=place(frozen.reward_params),
                   stats=replicate(frozen.stats), gold_params=None if frozen.gold_params is None else
                   place(frozen.gold_params), ref_samples=replicate(frozen.ref_samples))


def run(config, workdir: str) -> dict:
  """Trains the policy with `config`; returns the final checkpoint's metadata. A config whose
  `population` section names several members runs them as one population (`rmjax.rl.population`)."""
  if 'population' in config and (config.population.seeds or config.population.hparams):
    from rmjax.rl import population  # the population job builds on this module
    return population.run(config, workdir)
  validate(config)
  workdir = pathlib.Path(workdir)
  setup = build(config)
  seed = int(config.seed)
  policy_params = jax.jit(lambda: initial_policy(setup, seed))() if setup.base_params is None else setup.base_params
  optimizer = optim.make_optimizer(config.optim, total_updates(config))
  objective = objectives.build(config.objective)
  fns = it.make_functions(setup.policy_cfg, config.objective, setup.settings, setup.scorer, optimizer,
                          value_config=setup.value_cfg, gold_scorer=setup.gold_scorer)
  frozen = place_frozen(frozen_models(setup, policy_params), setup.mesh)
  init = lambda: init_run_state(setup, policy_params, optimizer, objective, seed)
  abstract = jax.eval_shape(init)
  shardings = state_lib.state_shardings(abstract, optimizer, setup.mesh)
  iteration = jax.jit(fns.iteration, donate_argnums=(0,), out_shardings=(shardings, None))
  evaluate = jax.jit(fns.evaluate)
  held_out = parallel.global_batch(setup.held_out, setup.mesh)

  @once_per_step(lambda state: state.step)
  def run_eval(state):
    metrics, samples = evaluate(state, frozen, held_out, eval_key(seed))
    return {f'eval/{k}': float(v) for k, v in jax.device_get(metrics).items()}, samples

  def metadata(state):
    # Called by the loop at each checkpoint: the held-out rollouts are written beside it.
    _, samples = run_eval(state)
    step = int(jax.device_get(state.step))
    write_rollouts(workdir / 'rollouts' / f'{step}.jsonl', samples, rollout_prompt_ids(setup),
                   int(config.data.prompt_len), setup.tok)
    return run_metadata(config, setup)

  state, meta = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc=f'rl {config.objective.advantage}'),
      train_step=lambda state, batch: iteration(state, frozen, batch),
      init_state=lambda: jax.jit(init, out_shardings=shardings)(),
      abstract_state=state_lib.with_shardings(abstract, shardings),
      batches=setup.batches, mesh=setup.mesh, metadata=metadata, evaluate=lambda state: run_eval(state)[0])
  return meta


def run_metadata(config, setup: Setup) -> dict:
  """The self-describing metadata of an RL policy checkpoint (`kind='rl_policy'`)."""
  return loop.describe(config, kind='rl_policy', model=setup.policy_cfg.to_dict(), tokenizer=setup.tok.to_dict(),
                       value_model=None if setup.value_cfg is None else setup.value_cfg.to_dict())


def base_config(advantage: str, arg: str):
  """The shared RL config of `configs/{ppo,rloo,grpo}.py`; `arg` 'tiny' (default) or 'test'."""
  import ml_collections  # configs only
  if arg not in ('tiny', 'test'):
    raise ValueError(f'unknown variant {arg!r}; choose tiny or test.')
  c = ml_collections.ConfigDict()
  c.job = 'rmjax.rl.trainer:run'
  c.seed = 0
  c.policy = ml_collections.ConfigDict(dict(path='', model=config_lib.model('tiny')))
  c.reward = ml_collections.ConfigDict(dict(path='', members='', toy_token=ord('e') + 3, seq_len=0, ref_samples=''))
  c.gold = ml_collections.ConfigDict(dict(path='', seq_len=0))
  c.data = ml_collections.ConfigDict(dict(seed=0, num_prompts=256, num_eval=16, prompt_len=24,
                                          prompts_per_iteration=16))
  c.rl = ml_collections.ConfigDict(dict(group_size=4, max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0,
                                        epochs=2, minibatches=4, missing_eos_penalty=0.0))
  c.objective = ml_collections.ConfigDict({'reward': 'mean', 'advantage': advantage, 'loss': 'ppo_clip'})
  if advantage == 'gae':
    c.objective.reward = 'mean,kl_penalty'
    c.objective.kl_penalty = dict(beta=0.05)
    c.objective.loss = 'ppo_clip,value'
    c.objective.gae = dict(gamma=1.0, lam=0.95)
  else:
    c.objective[advantage] = dict(group_size=4)
    c.objective.loss = 'ppo_clip,kl_k2'
    c.objective.kl_k2 = dict(coef=0.05)
  if advantage == 'dr_grpo':
    c.objective.reduction, c.objective.reduction_constant = 'constant', 24.0
  c.optim = config_lib.optim(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0)
  c.train = config_lib.train(60, log_every=10, eval_every=20, checkpoint_every=20)
  c.mesh = config_lib.mesh()
  # Several seeds or values: the members run as one vmapped program (`rmjax.rl.population`).
  c.population = ml_collections.ConfigDict(dict(seeds='', hparams=''))
  if arg == 'test':
    c.policy.model = config_lib.model('tiny', width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      max_len=64)
    c.data.update(num_prompts=16, num_eval=4, prompt_len=8, prompts_per_iteration=4)
    c.rl.update(max_new_tokens=6, minibatches=2)
    c.train = config_lib.train(6, log_every=2, eval_every=2, checkpoint_every=2)
    c.train.progress = False
  return c
