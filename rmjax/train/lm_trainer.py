"""Next-token training of a policy (pretraining or supervised fine-tuning), one compiled step.

Batch (from `rmjax.data.SequenceBatches`): `tokens [B, T]`, `mask [B, T]`, `loss_mask [B, T]`
(True where the token is a prediction target). Loss = Σ_t loss_mask·(−log p(x_t | x_<t)) over
the global batch divided by the global number of target tokens (`token_mean`), so the value
and gradient do not depend on how the batch is split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rmjax import objectives
from rmjax.models import transformer
from rmjax.models.config import ModelConfig
from rmjax.train import state as state_lib


def token_nll(params, config: ModelConfig, batch) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood `[B, T-1]` of tokens 1.. and its target mask."""
  logits = transformer.lm_logits(params, config, batch['tokens'], batch['mask'])[:, :-1]
  targets = batch['tokens'][:, 1:]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  target_mask = batch['loss_mask'][:, 1:] & batch['mask'][:, 1:] & (batch['weight'][:, None] > 0)
  return nll, target_mask


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *, state_shardings=None):
  """`step(state, batch) -> (state, metrics)`: 'loss' (token mean NLL), 'grad_norm', 'update_norm'."""

  def loss_fn(params, batch):
    nll, target_mask = token_nll(params, config, batch)
    return objectives.reduce(nll, target_mask, 'token_mean')

  def step(state: state_lib.TrainState, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'update_norm': optax.tree.norm(updates)}
    return state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

  out = (state_shardings, None) if state_shardings is not None else None
  return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_eval_fn(config: ModelConfig):
  """Jitted `(params, batch) -> (sum of NLL, number of target tokens)` for a held-out perplexity."""
  def ev(params, batch):
    nll, target_mask = token_nll(params, config, batch)
    return (nll * target_mask).sum(), target_mask.sum()
  return jax.jit(ev)
