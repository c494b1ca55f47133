"""Reward-model training: one compiled step for all K ensemble members.

Batch (from `rmjax.data.PairBatches`): `chosen_tokens`, `rejected_tokens` `[B, T]` int32 with
masks `[B, T]`, `weight [B]` (0 for padding rows), `index [B]` (the example's index in the
dataset). Chosen and rejected rows go through the model as one `[2B, T]` batch, giving
scores `[K, 2B]`. The loss of member k is the weighted mean over the *global* batch of the
configured reward-model loss (`rmjax.objectives`, e.g. Bradley–Terry
−log σ(r_c − r_r − m)), and the step minimizes Σ_k loss_k, so each full-ensemble member gets
exactly the gradient of its own loss; the optimizer runs per member (`per_member`), so
joint training equals K separate runs. With `bootstrap=True` member k weights example i by
w_ki ~ Poisson(1) drawn from (run key, k, i): an online bootstrap resample that does not
depend on how the data is batched (Oza & Russell, "Online bagging and boosting").
With `ensemble.head_bias='zero'` the reward head's bias gets a zero gradient and keeps its
initial value 0 exactly, so a score is `h · kernel` as in `transformers`' classification head
(pairwise losses do not depend on the bias, but Adam would move it by rounding noise).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.models import ensemble
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import KINDS, RewardModel
from rmjax.train import accumulate, loop, optim
from rmjax.train import state as state_lib

_BOOTSTRAP_TAG = 0x0B00
HEAD_BIAS = ('learned', 'zero')


def bootstrap_weights(key: jax.Array, index: jax.Array, num_members: int) -> jax.Array:
  """Poisson(1) weights `[K, B]`, a pure function of (key, member, example index)."""
  def one(k, i):
    return jax.random.poisson(jax.random.fold_in(jax.random.fold_in(key, k), i), 1.0).astype(jnp.float32)
  return jax.vmap(lambda k: jax.vmap(lambda i: one(k, i))(index))(jnp.arange(num_members))


def pair_scores(rm: RewardModel, params, batch) -> tuple[jax.Array, jax.Array]:
  """Scores of chosen and rejected rows, each `[K, B]`, from one forward pass over `[2B, T]`."""
  b = batch['chosen_tokens'].shape[0]
  tokens = jnp.concatenate([batch['chosen_tokens'], batch['rejected_tokens']], axis=0)
  mask = jnp.concatenate([batch['chosen_mask'], batch['rejected_mask']], axis=0)
  scores = rm.apply(params, tokens, mask)
  return scores[:, :b], scores[:, b:]


def make_train_step(rm: RewardModel, optimizer: optax.GradientTransformation, loss_fn, *,
                    bootstrap: bool = False, grad_accum_steps: int | str = 1, state_shardings=None):
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.

  loss_fn(r_chosen [B], r_rejected [B]) -> per-example losses [B] (a registered RM loss).
  grad_accum_steps: N, the global batch `[B, ...]` runs as N microbatches of B/N rows in one
  `lax.scan` (`rmjax.train.accumulate`); the loss Σ_b w_b·l_b / Σ_b w_b has its normaliser taken
  over the whole global batch, so the update equals N = 1 up to float summation order. `'auto'`:
  N = `accumulate.auto_steps(B, 2·T)` for the batch's B pairs of T tokens.
  metrics: 'loss' (mean over members), 'accuracy' (of the member-mean score), 'grad_norm',
  'update_norm', and per member 'loss_k' / 'accuracy_k'.
  """
  k = rm.num_members

  def losses(params, batch, key, n):
    rc, rr = pair_scores(rm, params, batch)
    per_example = jax.vmap(loss_fn)(rc, rr)  # [K, B]
    weight = jnp.broadcast_to(batch['weight'][None, :], per_example.shape)
    if bootstrap:
      weight = weight * bootstrap_weights(key, batch['index'], k)
    loss_k = jax.vmap(lambda v, w: objectives.reduce(v, w, 'token_mean', normalizer=n))(per_example, weight)
    w = batch['weight']
    correct_k = ((rc > rr) * w).sum(1)
    correct = (((rc - rr).mean(0) > 0) * w).sum()
    return loss_k.sum(), (loss_k, correct_k, correct)

  def step(state: state_lib.TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _BOOTSTRAP_TAG)
    # One normaliser for the whole global batch: the number of real pairs (PITFALLS #4).
    n = objectives.batch_normalizer(batch['weight'], 'token_mean')
    pairs, seq_len = batch['chosen_tokens'].shape
    micro = (accumulate.auto_steps(pairs, 2 * seq_len) if grad_accum_steps == accumulate.AUTO
             else grad_accum_steps)
    (_, (loss_k, correct_k, correct)), grads = accumulate.value_and_grad(
        lambda p, b: losses(p, b, key, n), state.params, batch, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.maximum(n, 1.0)
    acc_k = correct_k / n
    metrics = {'loss': loss_k.mean(), 'accuracy': correct / n,
               'grad_norm': optax.tree.norm(grads), 'update_norm': optax.tree.norm(updates)}
    if k > 1:
      metrics.update({f'loss_{i}': loss_k[i] for i in range(k)})
      metrics.update({f'accuracy_{i}': acc_k[i] for i in range(k)})
    new_state = state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    return new_state, metrics

  out = (state_shardings, None) if state_shardings is not None else None
  return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_score_fn(rm: RewardModel):
  """Jitted `scores(params, batch) -> (r_chosen [K, B], r_rejected [K, B])` for evaluation."""
  return jax.jit(lambda params, batch: pair_scores(rm, params, batch))


def collect_scores(score_fn, params, batches: Iterable[Mapping[str, np.ndarray]], mesh) -> dict[str, np.ndarray]:
  """Run over eval batches; return host arrays `r_chosen, r_rejected [K, N]`, `weight [N]`, and gold scores."""
  out = {'r_chosen': [], 'r_rejected': [], 'weight': [], 'gold_chosen': [], 'gold_rejected': []}
  for batch in batches:
    rc, rr = jax.device_get(score_fn(params, parallel.global_batch(batch, mesh)))
    out['r_chosen'].append(rc)
    out['r_rejected'].append(rr)
    out['weight'].append(batch['weight'])
    for g in ('gold_chosen', 'gold_rejected'):
      if g in batch:
        out[g].append(batch[g])
  res = {k: np.concatenate(v, axis=-1) for k, v in out.items() if v}
  keep = res['weight'] > 0
  return {k: v[..., keep] for k, v in res.items() if k != 'weight'}


def normalization_stats(r_reference: np.ndarray) -> objectives.RewardStats:
  """Per-member mean and std `[K]` of raw scores over reference responses `[K, N]` (PITFALLS #10)."""
  return objectives.RewardStats(mean=r_reference.mean(axis=1), std=np.maximum(r_reference.std(axis=1), 1e-6))


def pair_metrics(scores: Mapping[str, np.ndarray], loss_fn, *, aggregate: str = 'mean',
                 stats: objectives.RewardStats | None = None, prefix: str = 'eval/') -> dict[str, float]:
  """Held-out metrics from collected scores.

  `accuracy`: share of pairs whose aggregated reward prefers the labeled chosen response
  (`aggregate` over members, after normalization by `stats`); `accuracy_k` per member;
  `gold_accuracy` (and per member) against the gold's noiseless ordering when gold scores
  are present; `loss`: the mean per-member loss.
  """
  rc, rr = scores['r_chosen'], scores['r_rejected']
  k = rc.shape[0]
  agg = objectives.get(aggregate)
  a_c, a_r = np.asarray(agg(jnp.asarray(rc), stats=stats)), np.asarray(agg(jnp.asarray(rr), stats=stats))
  losses = np.asarray(jax.vmap(loss_fn)(jnp.asarray(rc), jnp.asarray(rr)))
  m = {f'{prefix}loss': float(losses.mean()), f'{prefix}accuracy': float(np.mean(a_c > a_r))}
  gold = 'gold_chosen' in scores
  if gold:
    sign = np.sign(scores['gold_chosen'] - scores['gold_rejected'])
    m[f'{prefix}gold_accuracy'] = float(np.mean(np.sign(a_c - a_r) == sign))
  if k > 1:
    for i in range(k):
      m[f'{prefix}accuracy_{i}'] = float(np.mean(rc[i] > rr[i]))
      if gold:
        m[f'{prefix}gold_accuracy_{i}'] = float(np.mean(np.sign(rc[i] - rr[i]) == sign))
  return m


class PerMember(NamedTuple):
  """An optimizer applied to each member of a stacked (full) ensemble on its own.

  `init` and `update` are `inner`'s, vmapped over the leading K axis, so gradient clipping,
  moments and step counts are per member: joint training of K members equals K separate
  runs. The state has `inner`'s tree structure (with a leading K on every leaf).
  """
  init: Callable
  update: Callable
  inner: optax.GradientTransformation


def per_member(optimizer: optax.GradientTransformation) -> PerMember:
  return PerMember(init=jax.vmap(optimizer.init), update=jax.vmap(optimizer.update), inner=optimizer)


def zero_head_bias(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` after setting the gradient of `reward_head/bias` to 0: Adam's moments stay 0 and
  so does the update, leaving the bias at its initial value bit for bit."""
  def is_bias(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: tuple(getattr(k, 'key', None) for k in path) == ('reward_head', 'bias'), params)
  return optax.chain(optax.masked(optax.set_to_zero(), is_bias), optimizer)


def with_backbone(rm: RewardModel, params, backbone):
  """Replace the backbone of every member by `backbone` (e.g. a pretrained LM's `params['backbone']`),
  or, for a 'full' ensemble, member k's by `backbone[k]` when `backbone` is a list of K backbones
  (e.g. LMs pretrained from different seeds)."""
  if isinstance(backbone, (list, tuple)):
    if rm.kind != 'full' or len(backbone) != rm.num_members:
      raise ValueError(f'init_backbone: a list of {len(backbone)} backbones needs a full ensemble of as many '
                       f'members; the model is {rm.kind!r} with {rm.num_members}.')
    return {**params, 'backbone': ensemble.stack(list(backbone))}
  if rm.kind == 'full':
    backbone = jax.tree.map(lambda x: jnp.broadcast_to(x, (rm.num_members,) + x.shape), backbone)
  return {**params, 'backbone': backbone}


def validate(config) -> None:
  """Check the RM sections (`model`, `ensemble`, `loss`, `optim`, `train`, `eval`) before compiling."""
  C = config_lib
  C.require_choice(config, 'ensemble.kind', KINDS)
  if config.ensemble.get('head_bias', 'learned') not in HEAD_BIAS:
    raise config_lib.ConfigError(f'config.ensemble.head_bias={config.ensemble.head_bias!r}: expected one of '
                                 f'{HEAD_BIAS}.')
  C.require_positive(config, 'ensemble.members', 'train.steps', 'train.batch_size', 'eval.batch_size')
  accumulate.check_steps(config.train, allow_auto=True)
  C.require_choice(config, 'loss.name', [e.name for e in objectives.entries('rm_loss')])
  C.require_choice(config, 'eval.aggregate', [e.name for e in objectives.entries('aggregation')])
  try:
    make_loss(config.loss)
    objectives.get(config.eval.aggregate)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.loss / config.eval.aggregate: {e}') from e


def make_loss(loss_config):
  """`config.loss` -> per-example loss callable: the named piece with the section's other fields."""
  kwargs = {k: v for k, v in loss_config.items() if k != 'name'}
  return objectives.get(loss_config.name, **kwargs)


def train(config, workdir, *, model_config: ModelConfig, train_batches, eval_batches, reference_batches, mesh,
          tokenizer, init_backbone=None) -> tuple[dict, dict]:
  """Train the ensemble; returns (params, final checkpoint metadata incl. normalization and eval).

  reference_batches: pair batches whose responses (chosen and rejected rows) give each member's
  normalization statistics (mean, std of its raw scores), saved with the final checkpoint.
  init_backbone: optional backbone params (e.g. a pretrained policy's) for every member, or a list
  of one backbone per member (`with_backbone`).
  """
  validate(config)
  rm = RewardModel(model_config, num_members=int(config.ensemble.members), kind=config.ensemble.kind)
  loss_fn = make_loss(config.loss)
  optimizer = optim.make_optimizer(config.optim, int(config.train.steps))
  if config.ensemble.get('head_bias', 'learned') == 'zero':
    optimizer = zero_head_bias(optimizer)
  if rm.kind == 'full':
    optimizer = per_member(optimizer)

  def init(rng):
    params = rm.init(rng)
    if init_backbone is not None:
      params = with_backbone(rm, params, init_backbone)
    return state_lib.create(params, optimizer, rng)

  rng = jax.random.key(int(config.seed))
  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh)
  step = make_train_step(rm, optimizer, loss_fn, bootstrap=bool(config.ensemble.bootstrap),
                         grad_accum_steps=accumulate.check_steps(config.train, allow_auto=True),
                         state_shardings=shardings)
  score_fn = make_score_fn(rm)

  def evaluate(state, stats=None):
    scores = collect_scores(score_fn, state.params, eval_batches, mesh)
    return pair_metrics(scores, loss_fn, aggregate=config.eval.aggregate, stats=stats)

  def finalize(state):
    ref = collect_scores(score_fn, state.params, reference_batches, mesh)
    stats = normalization_stats(np.concatenate([ref['r_chosen'], ref['r_rejected']], axis=1))
    return {'normalization': {'mean': stats.mean.tolist(), 'std': stats.std.tolist()},
            'eval': evaluate(state, stats)}

  meta = loop.describe(config, kind='reward_model', model=rm.to_dict(), tokenizer=tokenizer.to_dict())
  state, final_meta = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(config.train, desc='reward model'), train_step=step,
      init_state=lambda: jax.jit(init, out_shardings=shardings)(rng),
      abstract_state=state_lib.with_shardings(abstract, shardings), batches=train_batches, mesh=mesh,
      metadata=lambda _: meta, evaluate=evaluate, finalize=finalize)
  return state.params, final_meta
