"""Next-token training of a policy (pretraining or supervised fine-tuning), one compiled step.

Batch (from `rmjax.data.SequenceBatches`): `tokens [B, T]`, `mask [B, T]`, `loss_mask [B, T]`
(True where the token is a prediction target). Loss = Σ_t loss_mask·(−log p(x_t | x_<t)) over
the global batch divided by the global number of target tokens (`token_mean`), so the value
and gradient do not depend on how the batch is split (over devices, or into the
`train.grad_accum_steps` microbatches of `rmjax.train.accumulate`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rmjax import objectives
from rmjax.models import transformer
from rmjax.models.config import ModelConfig
from rmjax.train import accumulate, loop, optim
from rmjax.train import state as state_lib


def token_nll(params, config: ModelConfig, batch) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood `[B, T-1]` of tokens 1.. and its target mask."""
  logits = transformer.lm_logits(params, config, batch['tokens'], batch['mask'], head_slice=slice(None, -1))
  targets = batch['tokens'][:, 1:]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return nll, target_mask(batch)


def target_mask(batch) -> jax.Array:
  """`[B, T-1]` True where token t+1 is a prediction target of a real row."""
  return batch['loss_mask'][:, 1:] & batch['mask'][:, 1:] & (batch['weight'][:, None] > 0)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    state_shardings=None):
  """`step(state, batch) -> (state, metrics)`: 'loss' (token mean NLL), 'grad_norm', 'update_norm'.

  grad_accum_steps: N microbatches of B/N rows in one `lax.scan`; the loss
  Σ m·nll / N_tok has N_tok counted over the whole global batch, so the update equals N = 1.
  """

  def loss_fn(params, batch, n):
    nll, mask = token_nll(params, config, batch)
    return objectives.reduce(nll, mask, 'token_mean', normalizer=n), ()

  def step(state: state_lib.TrainState, batch):
    n = objectives.batch_normalizer(target_mask(batch), 'token_mean')
    (loss, _), grads = accumulate.value_and_grad(lambda p, b: loss_fn(p, b, n), state.params, batch,
                                                 grad_accum_steps)
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


def train(section, workdir, *, model_config: ModelConfig, batches, mesh, tokenizer, run_config,
          init_params=None) -> tuple[dict, dict]:
  """Train a causal LM with `section.optim` / `section.train`; returns (params, checkpoint metadata).

  Resumes from `workdir/checkpoints` when there; else starts from `init_params` if given,
  else from a fresh init with the run seed.
  """
  grad_accum_steps = accumulate.check_steps(section.train)
  optimizer = optim.make_optimizer(section.optim, int(section.train.steps))

  def init(rng):
    params = init_params if init_params is not None else transformer.init_lm(rng, model_config)
    return state_lib.create(params, optimizer, rng)

  rng = jax.random.key(int(run_config.seed))
  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh)
  abstract = state_lib.with_shardings(abstract, shardings)
  step = make_train_step(model_config, optimizer, grad_accum_steps=grad_accum_steps, state_shardings=shardings)
  meta = loop.describe(run_config, kind='causal_lm', model=model_config.to_dict(),
                             tokenizer=tokenizer.to_dict())
  state, final_meta = loop.run(
      workdir=workdir, loop=loop.LoopConfig.from_config(section.train, desc='policy'), train_step=step,
      init_state=lambda: jax.jit(init, out_shardings=shardings)(rng), abstract_state=abstract,
      batches=batches, mesh=mesh, metadata=lambda _: meta)
  return state.params, final_meta
