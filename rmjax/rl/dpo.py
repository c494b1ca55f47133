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
weighted mean over the global batch (padding rows weigh 0). At π = π_ref the DPO loss is log 2
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
from typing import Any

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
from rmjax.train import accumulate, loop, optim
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


def _weighted(terms: dict[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
  n = jnp.maximum(weight.sum(), 1.0)
  out = {k: (v * weight).sum() / n for k, v in terms.items()}
  out['accuracy'] = ((terms['margin'] > 0) * weight).sum() / n
  return out


def make_train_step(config: ModelConfig, loss_fn, optimizer: optax.GradientTransformation, *,
                    state_shardings=None):
  """Jitted `step(state, ref_params, batch) -> (state, metrics)`, the state donated.

  loss_fn: a preference loss `(logp_c, logp_r, ref_c, ref_r, mask_c, mask_r) -> [B]`. The loss
  is Σ_i w_i ℓ_i / Σ_i w_i over the global batch (`weight` from `PairBatches`).
  """

  def loss(params, ref_params, batch):
    terms = pair_terms(params, ref_params, config, loss_fn, batch)
    metrics = _weighted(terms, batch['weight'].astype(jnp.float32))
    return metrics['loss'], metrics

  def step(state: state_lib.TrainState, ref_params, batch):
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, ref_params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

  out = (state_shardings, None) if state_shardings is not None else None
  return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_eval_fn(config: ModelConfig, loss_fn):
  """Jitted `(params, ref_params, batch) -> per-pair terms [B]` (loss, log-ratios, margin)."""
  return jax.jit(lambda params, ref, batch: pair_terms(params, ref, config, loss_fn, batch))


def evaluate(eval_fn, params, ref_params, batches, mesh) -> dict[str, float]:
  """Held-out `eval/loss`, `eval/accuracy`, `eval/margin` (and `eval/gold_accuracy` with gold scores)."""
  terms, weights, gold = [], [], []
  for batch in batches:
    terms.append(jax.device_get(eval_fn(params, ref_params, parallel.global_batch(batch, mesh))))
    weights.append(batch['weight'])
    if 'gold_chosen' in batch:
      gold.append(batch['gold_chosen'] - batch['gold_rejected'])
  keep = np.concatenate(weights) > 0
  t = {k: np.concatenate([x[k] for x in terms])[keep] for k in terms[0]}
  out = {'eval/loss': float(t['loss'].mean()), 'eval/accuracy': float(np.mean(t['margin'] > 0)),
         'eval/margin': float(t['margin'].mean())}
  if gold:
    out['eval/gold_accuracy'] = float(np.mean(np.sign(t['margin']) == np.sign(np.concatenate(gold)[keep])))
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
  accumulate.reject(config.train, 'DPO trainer', 'lower data.batch_size to fit memory')
  try:
    objective = objectives.build(config.objective)
  except ValueError as e:
    raise C.ConfigError(f'config.objective: {e}') from e
  if objective.preference_loss is None:
    raise C.ConfigError('config.objective.preference_loss is empty; choose dpo or ipo.')
  parallel.mesh_from_config(config.mesh)


def run(config, workdir: str) -> dict:
  """Trains the policy on preference pairs; returns the final checkpoint's metadata."""
  from rmjax.rl import trainer  # checkpoint loading shared with the RL trainer
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  mesh = parallel.mesh_from_config(config.mesh)
  rng = jax.random.key(int(config.seed))
  tok = ByteTokenizer()
  if config.policy.path:  # pairs are tokenized with the policy's own tokenizer
    ref_params, model_cfg, tok_dict = trainer.load_policy(config.policy.path)
    tok = tokenizer_from_dict(tok_dict) if tok_dict else tok
  else:
    model_cfg = config_lib.model_config(config.policy.model, vocab_size=tok.vocab_size)
    ref_params = jax.jit(transformer.init_lm, static_argnums=1)(jax.random.fold_in(rng, 1), model_cfg)
  loss_fn = objectives.build(config.objective).preference_loss
  optimizer = optim.make_optimizer(config.optim, int(config.train.steps))
  src = sources(config, workdir)
  d = config.data
  share = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = pipeline.PairBatches(src[d.train_split], tok, seq_len=int(d.seq_len),
                                       global_batch_size=int(d.batch_size), seed=int(config.seed), **share)

  class _HeldOut:  # one pass over the eval split each time it is iterated
    def __iter__(self):
      b = pipeline.PairBatches(src[d.eval_split], tok, seq_len=int(d.seq_len),
                               global_batch_size=int(d.eval_batch_size), seed=int(config.seed), shuffle=False,
                               drop_remainder=False, **share)
      return (b[i] for i in range(len(b)))

  def init(key):
    return state_lib.create(jax.tree.map(jnp.array, ref_params), optimizer, key)

  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh)
  step = make_train_step(model_cfg, loss_fn, optimizer, state_shardings=shardings)
  eval_fn = make_eval_fn(model_cfg, loss_fn)
  meta = loop.describe(config, kind='causal_lm', model=model_cfg.to_dict(), tokenizer=tok.to_dict(),
                       trainer=str(config.objective.preference_loss))
  _, final = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc=str(config.objective.preference_loss)),
      train_step=lambda state, batch: step(state, ref_params, batch),
      init_state=lambda: jax.jit(init, out_shardings=shardings)(rng),
      abstract_state=state_lib.with_shardings(abstract, shardings), batches=train_batches, mesh=mesh,
      metadata=lambda _: meta, evaluate=lambda state: evaluate(eval_fn, state.params, ref_params, _HeldOut(), mesh))
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
  if size == 'test':
    c.policy.model = config_lib.model('tiny', width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      max_len=64)
    c.data.update(num_train=128, num_eval=32, seq_len=48, batch_size=16, eval_batch_size=32)
    c.optim = config_lib.optim(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0)
    c.train = config_lib.train(8, log_every=2, eval_every=4, checkpoint_every=4)
    c.train.progress = False
  return c
