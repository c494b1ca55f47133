"""The DPO / IPO trainer (`configs/dpo.py`): offline policy optimization on preference pairs.

`python -m rmjax.main --config=configs/dpo.py[:test] --workdir=DIR`.

Policy: `config.policy.path` names a causal-LM checkpoint (`rmjax.train.checkpoint.load`; an RL
run's checkpoint works too), or '' for a fresh `config.policy.model` from the seed. The
reference π_ref is a frozen copy of the initial policy, passed to the step as an argument.

Pairs (`config.data.source`), always read through the reward-model pipeline
(`rmjax.data.PairBatches`: `[bos]? + prompt + response + eos`, `*_response_mask` on the
response tokens and the eos):
  'toy'    a toy preference written by the job itself to `DIR/data/toy_<split>.jsonl` and read
           with `rmjax.data.JsonlPreferences`: prompts of the built-in synthetic language, two
           random lowercase responses of equal length, the chosen one holding the letter
           `data.toy_letter` at about 40% of its positions, the rejected one never.
  'jsonl'  `data.path` = comma-separated `split=file.jsonl` entries (`JsonlPreferences` rows).
  'tfds'   `data.path` = a prepared preference dataset folder, e.g. the pairs the reward-model
           job writes (`W/data` of `configs/rm.py`; the one dataset below it is found).

Step (one `jax.jit`, state donated): per-token log-probs of chosen and rejected rows under π
and π_ref (`rmjax.models.token_logprobs`, one `[2B, T]` pass each), the selected
`config.objective.preference_loss` (`dpo` or `ipo` of `rmjax.objectives`, `[B]`), reduced as a
weighted mean over the global batch (padding rows weigh 0), optionally in
`train.grad_accum_steps` microbatches (the same result). At π = π_ref the DPO loss is log 2
and the IPO loss (1/(2τ))².

Metrics: `loss`, `accuracy` (share of pairs whose implicit reward β·log π/π_ref, summed over
the response, is higher for the chosen response; β > 0 does not change it), `margin` (mean of
h = Σ log-ratio chosen − Σ log-ratio rejected), `logratio_chosen`, `logratio_rejected`,
`grad_norm`. Every `train.eval_every` steps the held-out split gives `eval/loss`,
`eval/accuracy`, `eval/margin` and, when the pairs carry gold scores, `eval/gold_accuracy`
(the sign of h against the sign of the gold score difference). Resume is exact (`loop.run`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.data import builders, pipeline
from rmjax.data.synthetic_language import Grammar
from rmjax.data.tokenizer import ByteTokenizer, tokenizer_from_dict
from rmjax.models import sampling, transformer
from rmjax.models.config import ModelConfig
from rmjax.train import accumulate, checkpoint, loop, optim
from rmjax.train import state as state_lib

SOURCES = ('toy', 'jsonl', 'tfds')
LOSSES = ('dpo', 'ipo')


def response_logprobs(params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
                      response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(log π(x_t | x_<t) [B, T], target mask [B, T] float)` on the response tokens (not position 0)."""
  lp = sampling.token_logprobs(params, config, tokens, mask)
  target = response_mask & mask & (jnp.arange(tokens.shape[1]) > 0)
  return jnp.where(target, lp, 0.0), target.astype(jnp.float32)


def pair_logprobs(params, config: ModelConfig, batch) -> tuple[jax.Array, ...]:
  """`(logp_chosen, logp_rejected, mask_chosen, mask_rejected)` `[B, T]`, one `[2B, T]` pass."""
  b = batch['chosen_tokens'].shape[0]
  cat = lambda name: jnp.concatenate([batch[f'chosen_{name}'], batch[f'rejected_{name}']], axis=0)
  lp, m = response_logprobs(params, config, cat('tokens'), cat('mask'), cat('response_mask'))
  return lp[:b], lp[b:], m[:b], m[b:]


def pair_terms(params, ref_params, config: ModelConfig, loss_fn, batch) -> dict[str, jax.Array]:
  """Per pair `[B]`: the loss, the sequence log-ratios Σ_t (log π − log π_ref) of both sides and h."""
  lp_c, lp_r, m_c, m_r = pair_logprobs(params, config, batch)
  ref_c, ref_r, _, _ = jax.tree.map(jax.lax.stop_gradient, pair_logprobs(ref_params, config, batch))
  loss = loss_fn(lp_c, lp_r, ref_c, ref_r, m_c, m_r)
  lr_c = ((lp_c - ref_c) * m_c).sum(-1)
  lr_r = ((lp_r - ref_r) * m_r).sum(-1)
  return dict(loss=loss, logratio_chosen=lr_c, logratio_rejected=lr_r, margin=lr_c - lr_r)


def _weighted(terms: dict[str, jax.Array], weight: jax.Array, n: jax.Array) -> dict[str, jax.Array]:
  """Σ_i w_i t_i / n of every per-pair term, and the weighted share of positive margins."""
  out = {k: (v * weight).sum() / n for k, v in terms.items()}
  out['accuracy'] = ((terms['margin'] > 0) * weight).sum() / n
  return out


def update(config: ModelConfig, loss_fn, optimizer: optax.GradientTransformation, state: state_lib.TrainState,
           ref_params, batch, grad_accum_steps: int = 1) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on the weighted loss Σ_i w_i ℓ_i / Σ_i w_i over the global batch
  (`weight` from `PairBatches`). loss_fn: a preference loss
  `(logp_c, logp_r, ref_c, ref_r, mask_c, mask_r) -> [B]`. grad_accum_steps: N microbatches of
  B/N pairs in one `lax.scan` (`rmjax.train.accumulate`); Σ_i w_i is taken over the whole batch
  first, so the loss, the metrics and the gradient do not depend on N."""
  n = jnp.maximum(batch['weight'].astype(jnp.float32).sum(), 1.0)

  def loss(params, micro):
    metrics = _weighted(pair_terms(params, ref_params, config, loss_fn, micro), micro['weight'].astype(jnp.float32),
                        n)
    return metrics['loss'], metrics

  (_, metrics), grads = accumulate.value_and_grad(loss, state.params, batch, grad_accum_steps)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics


def make_train_step(config: ModelConfig, loss_fn, optimizer: optax.GradientTransformation, *,
                    grad_accum_steps: int = 1, state_shardings=None):
  """Jitted `step(state, ref_params, batch) -> (state, metrics)` (`update`), the state donated."""
  out = (state_shardings, None) if state_shardings is not None else None
  return jax.jit(lambda state, ref, batch: update(config, loss_fn, optimizer, state, ref, batch, grad_accum_steps),
                 donate_argnums=(0,), out_shardings=out)


def make_eval_fn(config: ModelConfig, loss_fn):
  """Jitted `(params, ref_params, batch) -> per-pair terms [B]` (loss, log-ratios, margin)."""
  return jax.jit(lambda params, ref, batch: pair_terms(params, ref, config, loss_fn, batch))


def evaluate(eval_fn, params, ref_params, batches, mesh, members: int | None = None) -> dict[str, float]:
  """Held-out `eval/loss`, `eval/accuracy`, `eval/margin` (and `eval/gold_accuracy` with gold scores).

  members: for a population, eval_fn's terms are `[B, P]` and the keys `eval/member_<i>/<name>`
  (with the mean over members under the plain name).
  """
  terms, weights, gold = [], [], []
  for batch in batches:
    terms.append(jax.device_get(eval_fn(params, ref_params, parallel.global_batch(batch, mesh))))
    weights.append(batch['weight'])
    if 'gold_chosen' in batch:
      gold.append(batch['gold_chosen'] - batch['gold_rejected'])
  keep = np.concatenate(weights) > 0
  gold = np.concatenate(gold)[keep] if gold else None

  def summary(t):
    out = {'loss': float(t['loss'].mean()), 'accuracy': float(np.mean(t['margin'] > 0)),
           'margin': float(t['margin'].mean())}
    if gold is not None:
      out['gold_accuracy'] = float(np.mean(np.sign(t['margin']) == np.sign(gold)))
    return out

  t = {k: np.concatenate([x[k] for x in terms])[keep] for k in terms[0]}
  if members is None:
    return {f'eval/{k}': v for k, v in summary(t).items()}
  per = [summary({k: v[:, i] for k, v in t.items()}) for i in range(members)]
  out = {f'eval/member_{i}/{k}': v for i, m in enumerate(per) for k, v in m.items()}
  out.update({f'eval/{k}': float(np.mean([m[k] for m in per])) for k in per[0]})
  return out


def toy_pairs(num: int, *, seed: int, letter: str, grammar_seed: int) -> list[dict[str, Any]]:
  """`num` toy pairs: a grammar prompt, two random lowercase responses of 4..10 letters of equal
  length; the chosen one has `letter` at about 40% of its positions, the rejected one none."""
  rng = np.random.default_rng(seed)
  prompts = Grammar.random(grammar_seed).prompts(num, seed=seed)
  alphabet = np.array([c for c in 'abcdefghijklmnopqrstuvwxyz' if c != letter])
  rows = []
  for i in range(num):
    n = int(rng.integers(4, 11))
    chosen = rng.choice(alphabet, n)
    chosen[rng.random(n) < 0.4] = letter
    rows.append(dict(prompt_id=i, prompt=prompts[i], chosen=''.join(chosen),
                     rejected=''.join(rng.choice(alphabet, n))))
  return rows


def _tfds_folder(path: str) -> pathlib.Path:
  root = pathlib.Path(path)
  if (root / 'dataset_info.json').is_file():
    return root
  found = sorted(p.parent for p in root.glob('**/dataset_info.json') if 'incomplete' not in str(p))
  if len(found) != 1:
    raise config_lib.ConfigError(f'config.data.path={path!r}: expected one prepared dataset (a folder with '
                                 f'dataset_info.json) below it, found {len(found)}: {[str(f) for f in found]}.')
  return found[0]


def sources(config, workdir: pathlib.Path) -> dict[str, Any]:
  """Split name -> random-access source of preference rows, for `config.data`."""
  d = config.data
  splits = (d.train_split, d.eval_split)
  if d.source == 'toy':
    files = {}
    for split, num, seed in ((d.train_split, d.num_train, 1), (d.eval_split, d.num_eval, 2)):
      path = workdir / 'data' / f'toy_{split}.jsonl'
      if not path.is_file():  # written once; a resumed run reads the same file
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = toy_pairs(int(num), seed=int(config.seed) * 1000 + seed, letter=d.toy_letter,
                         grammar_seed=int(config.seed))
        tmp = path.with_suffix('.tmp')
        tmp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        tmp.rename(path)
      files[split] = [str(path)]
    builder = builders.JsonlPreferences(data_dir=str(workdir / 'data' / 'tfds'), files=files)
  elif d.source == 'jsonl':
    files = {}
    for entry in filter(None, (e.strip() for e in d.path.split(','))):
      split, sep, file = entry.partition('=')
      if not sep:
        raise config_lib.ConfigError(f"config.data.path: entry {entry!r} must read 'split=file.jsonl'.")
      files.setdefault(split.strip(), []).append(file.strip())
    missing = [s for s in splits if s not in files]
    if missing:
      raise config_lib.ConfigError(f'config.data.path={d.path!r} gives no file for splits {missing}.')
    builder = builders.JsonlPreferences(data_dir=str(workdir / 'data' / 'tfds'), files=files)
  else:
    builder = tfds.builder_from_directory(str(_tfds_folder(d.path)))
  if d.source != 'tfds':
    builder.download_and_prepare()
  known = list(builder.info.splits)
  missing = [s for s in splits if s not in known]
  if missing:
    raise config_lib.ConfigError(f'config.data: splits {missing} are not in the dataset (it has {known}); '
                                 'set data.train_split / data.eval_split.')
  return {s: builder.as_data_source(s) for s in splits}


def validate(config) -> None:
  """Checks the DPO sections before anything compiles."""
  C = config_lib
  C.require_choice(config, 'data.source', SOURCES)
  C.require_positive(config, 'data.seq_len', 'data.batch_size', 'data.eval_batch_size', 'data.num_train',
                     'data.num_eval', 'train.steps')
  if config.data.source != 'toy' and not config.data.path:
    raise C.ConfigError(f"config.data.path is empty; data.source={config.data.source!r} reads pairs from it.")
  if config.data.source == 'toy' and len(config.data.toy_letter) != 1:
    raise C.ConfigError(f'config.data.toy_letter={config.data.toy_letter!r}: expected one letter.')
  C.require_choice(config, 'objective.preference_loss', LOSSES)
  accumulate.check_steps(config.train, batch_size=config.data.batch_size, batch_field='data.batch_size')
  try:
    objective = objectives.build(config.objective)
  except ValueError as e:
    raise C.ConfigError(f'config.objective: {e}') from e
  if objective.preference_loss is None:
    raise C.ConfigError('config.objective.preference_loss is empty; choose dpo or ipo.')
  parallel.mesh_from_config(config.mesh)


class _Setup(NamedTuple):
  """What the single-run and the population jobs share."""
  ref_params: Any  # the initial policy (None: a fresh one per seed, `_fresh_policy`)
  model_cfg: ModelConfig
  tok: Any
  loss_fn: Any
  sources: dict[str, Any]
  mesh: Any


def _setup(config, workdir: pathlib.Path) -> _Setup:
  from rmjax.rl import trainer  # checkpoint loading shared with the RL trainer
  tok, ref_params = ByteTokenizer(), None
  if config.policy.path:  # pairs are tokenized with the policy's own tokenizer
    ref_params, model_cfg, tok_dict = trainer.load_policy(config.policy.path)
    tok = tokenizer_from_dict(tok_dict) if tok_dict else tok
  else:
    model_cfg = config_lib.model_config(config.policy.model, vocab_size=tok.vocab_size)
  return _Setup(ref_params, model_cfg, tok, objectives.build(config.objective).preference_loss,
                sources(config, workdir), parallel.mesh_from_config(config.mesh))


def _fresh_policy(model_cfg: ModelConfig, seed) -> Any:
  """A fresh policy (and reference) from `seed`, as `configs/dpo.py` makes it without `policy.path`."""
  return transformer.init_lm(jax.random.fold_in(jax.random.key(seed), 1), model_cfg)


def _train_batches(config, setup: _Setup, seed: int) -> pipeline.PairBatches:
  d = config.data
  return pipeline.PairBatches(setup.sources[d.train_split], setup.tok, seq_len=int(d.seq_len),
                              global_batch_size=int(d.batch_size), seed=seed, process_index=jax.process_index(),
                              process_count=jax.process_count())


class _HeldOut:
  """One pass over the eval split each time it is iterated."""

  def __init__(self, config, setup: _Setup):
    d = config.data
    self.make = lambda: pipeline.PairBatches(
        setup.sources[d.eval_split], setup.tok, seq_len=int(d.seq_len), global_batch_size=int(d.eval_batch_size),
        seed=int(config.seed), shuffle=False, drop_remainder=False, process_index=jax.process_index(),
        process_count=jax.process_count())

  def __iter__(self):
    b = self.make()
    return (b[i] for i in range(len(b)))


def run(config, workdir: str) -> dict:
  """Trains the policy on preference pairs; returns the final checkpoint's metadata. A
  `population` section naming several members runs them as one program (`run_population`)."""
  if config.population.seeds or config.population.hparams:
    return run_population(config, workdir)
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  setup = _setup(config, workdir)
  mesh, rng = setup.mesh, jax.random.key(int(config.seed))
  ref_params = setup.ref_params
  if ref_params is None:
    ref_params = jax.jit(_fresh_policy, static_argnums=0)(setup.model_cfg, int(config.seed))
  ref_params = state_lib.place_params(ref_params, mesh)
  optimizer = optim.make_optimizer(config.optim, int(config.train.steps))

  def init(key):
    return state_lib.create(jax.tree.map(jnp.array, ref_params), optimizer, key)

  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh)
  step = make_train_step(setup.model_cfg, setup.loss_fn, optimizer,
                         grad_accum_steps=int(config.train.grad_accum_steps), state_shardings=shardings)
  eval_fn = make_eval_fn(setup.model_cfg, setup.loss_fn)
  meta = loop.describe(config, kind='causal_lm', model=setup.model_cfg.to_dict(), tokenizer=setup.tok.to_dict(),
                       trainer=str(config.objective.preference_loss))
  held_out = _HeldOut(config, setup)
  _, final = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc=str(config.objective.preference_loss)),
      train_step=lambda state, batch: step(state, ref_params, batch),
      init_state=lambda: jax.jit(init, out_shardings=shardings)(rng),
      abstract_state=state_lib.with_shardings(abstract, shardings), batches=_train_batches(config, setup,
                                                                                           int(config.seed)),
      mesh=mesh, metadata=lambda _: meta, evaluate=lambda state: evaluate(eval_fn, state.params, ref_params,
                                                                          held_out, mesh))
  return final


class _MemberBatches:
  """Batch `s` of every member's own pair order (its seed), stacked on axis 1: `[B, P, ...]`."""

  def __init__(self, batches: list[pipeline.PairBatches]):
    self.batches = batches

  def __len__(self) -> int:
    return len(self.batches[0])

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    rows = [b[step] for b in self.batches]
    return {k: np.stack([r[k] for r in rows], axis=1) for k in rows[0]}


def population_functions(config: ModelConfig, objective_section, optimizer: optax.GradientTransformation, *,
                         ref_axis: int | None, grad_accum_steps: int = 1):
  """`(step, terms)`, unjitted, for a population: a `TrainState` with a leading member axis P and
  `values` (`objective.*` path or `optim.lr` -> `[P]`, see `rmjax.rl.population`).

  step(states, ref_params, values, batch [B, P, ...]) -> (states, metrics: the mean over members
  and `member_<i>/<name>`): member i's `update` on its own rows `batch[:, i]` with its objective
  coefficients (traced), its learning rate in its optimizer state.
  terms(params, ref_params, values, batch [B, ...]) -> per-pair terms `[B, P]` of every member on one batch.
  ref_axis: 0 when the reference is stacked per member, None when shared.
  """
  from rmjax.rl import population as pop  # member values shared with RL populations

  def loss_fn(member_values):
    return objectives.build(pop.with_values(objective_section, member_values)).preference_loss

  def step(states, ref_params, values, batch):
    one = lambda state, r, b, v: update(config, loss_fn(v), optimizer, state, r, b, grad_accum_steps)
    states, metrics = jax.vmap(one, in_axes=(0, ref_axis, 1, 0))(states, ref_params, batch, values)
    return states, pop.flat_metrics(metrics)

  def terms(params, ref_params, values, batch):
    one = lambda p, r, v: pair_terms(p, r, config, loss_fn(v), batch)
    return jax.vmap(one, in_axes=(0, ref_axis, 0), out_axes=1)(params, ref_params, values)

  return step, terms


def run_population(config, workdir: str) -> dict:
  """DPO runs that differ in seed, objective coefficients (β, ...) or `optim.lr`
  (`config.population`, read as `rmjax.rl.population.parse_members` reads it) as one vmapped
  program. Member i is the run of `population.member_config(config, member_i)`: its own pair
  order (its seed), its coefficients inside the vmapped loss, its learning rate in the optimizer
  state; the reference is the shared initial policy (per member for a fresh policy of several
  seeds). Outputs: the population's checkpoints and `metrics.jsonl` (`member_<i>/<name>` and the
  mean under the plain name) in `DIR`; at each checkpoint `DIR/members/<i>/checkpoints/<step>`,
  a `causal_lm` checkpoint of member i with its own config, and `DIR/members/<i>/metrics.jsonl`.
  """
  from rmjax.rl import population as pop  # member parsing and learning rates shared with RL populations
  members = pop.parse_members(config)
  configs = [pop.member_config(config, m) for m in members]
  for c in configs:
    validate(c)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  setup = _setup(config, workdir)
  size, paths = len(members), sorted(members[0].values)
  values = {p: jnp.asarray([m.values[p] for m in members], jnp.float32) for p in paths}
  seeds = jnp.asarray([m.seed for m in members], jnp.uint32)
  vary_lr = pop.LR in paths
  steps = int(config.train.steps)
  optimizer = pop.lr_optimizer(config.optim, steps) if vary_lr else optim.make_optimizer(config.optim, steps)
  fresh = setup.ref_params is None
  ref = jax.jit(jax.vmap(lambda s: _fresh_policy(setup.model_cfg, s)))(seeds) if fresh else setup.ref_params
  ref = state_lib.place_params(ref, setup.mesh, population=fresh)
  ref_axis = 0 if fresh else None
  step, terms = population_functions(setup.model_cfg, config.objective, optimizer, ref_axis=ref_axis,
                                     grad_accum_steps=int(config.train.grad_accum_steps))

  def init():
    def one(ref_params, seed, lr):
      state = state_lib.create(jax.tree.map(jnp.array, ref_params), optimizer,
                               jax.random.key(seed))
      return state._replace(opt_state=pop.set_lr(state.opt_state, lr)) if vary_lr else state
    lrs = values[pop.LR] if vary_lr else jnp.zeros(size)
    return jax.vmap(one, in_axes=(ref_axis, 0, 0))(ref, seeds, lrs)

  abstract = jax.eval_shape(init)
  shardings = state_lib.state_shardings(abstract, optimizer, setup.mesh, population=True)
  step_fn = jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
  eval_fn = jax.jit(lambda params, ref_params, batch: terms(params, ref_params, values, batch))
  held_out = _HeldOut(config, setup)

  def metadata(states):
    step_done = int(jax.device_get(states.step[0]))
    for i, c in enumerate(configs):
      with checkpoint.Checkpointer(workdir / 'members' / str(i) / 'checkpoints', max_to_keep=int(config.train.keep),
                                   async_save=False) as ckpt:
        ckpt.save(step_done, pop.member_slice(states, i), dict(
            loop.describe(c, kind='causal_lm', model=setup.model_cfg.to_dict(), tokenizer=setup.tok.to_dict(),
                          trainer=str(config.objective.preference_loss)), member=i, population=str(workdir)),
                  force=True)
    pop.split_metrics(workdir, size)
    return dict(loop.describe(config, kind='dpo_population', model=setup.model_cfg.to_dict(),
                              tokenizer=setup.tok.to_dict()), members=[m._asdict() for m in members])

  _, final = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc=f'DPO population of {size}'),
      train_step=lambda states, batch: step_fn(states, ref, values, batch),
      init_state=lambda: jax.jit(init, out_shardings=shardings)(),
      abstract_state=state_lib.with_shardings(abstract, shardings),
      batches=_MemberBatches([_train_batches(c, setup, int(c.seed)) for c in configs]), mesh=setup.mesh,
      metadata=metadata, evaluate=lambda states: evaluate(eval_fn, states.params, ref, held_out, setup.mesh,
                                                          members=size))
  return final


def get_config(arg: str = 'tiny'):
  """`configs/dpo.py`: `arg` = 'tiny' (default) or 'test', optionally ',ipo' (e.g. 'test,ipo')."""
  import ml_collections  # configs only
  size, _, loss = arg.partition(',')
  if size not in ('tiny', 'test') or loss not in ('', 'dpo', 'ipo'):
    raise ValueError(f"configs/dpo.py: unknown variant {arg!r}; choose tiny or test, optionally ',ipo' "
                     "(e.g. 'test,ipo').")
  loss = loss or 'dpo'
  c = ml_collections.ConfigDict()
  c.job = 'rmjax.rl.dpo:run'
  c.seed = 0
  c.policy = ml_collections.ConfigDict(dict(path='', model=config_lib.model('tiny')))
  c.data = ml_collections.ConfigDict(dict(source='toy', path='', train_split='train', eval_split='eval',
                                          toy_letter='e', num_train=2048, num_eval=128, seq_len=64, batch_size=32,
                                          eval_batch_size=64))
  c.objective = ml_collections.ConfigDict({'preference_loss': loss})
  c.objective[loss] = dict(beta=0.1, label_smoothing=0.0) if loss == 'dpo' else dict(tau=0.1, average=False)
  c.optim = config_lib.optim(lr=1e-3, warmup_steps=10, schedule='cosine', weight_decay=0.0)
  c.train = config_lib.train(200, log_every=20, eval_every=40, checkpoint_every=100)
  c.mesh = config_lib.mesh()
  # Several seeds or coefficients: the members run as one vmapped program (`run_population`), e.g.
  # seeds='0,1,2' and hparams='objective.dpo.beta=0.05,0.1,0.5'.
  c.population = ml_collections.ConfigDict(dict(seeds='', hparams=''))
  if size == 'test':
    c.policy.model = config_lib.model('tiny', width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      max_len=64)
    c.data.update(num_train=128, num_eval=32, seq_len=48, batch_size=16, eval_batch_size=32)
    c.optim = config_lib.optim(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0)
    c.train = config_lib.train(8, log_every=2, eval_every=4, checkpoint_every=4)
    c.train.progress = False
  return c
