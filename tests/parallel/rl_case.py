"""The PPO-iteration case shared by the multi-device and multi-process checks (import after setting XLA_FLAGS).

One PPO iteration: a `tiny` policy with a value head, a 2-member full reward model, a KL
penalty, 8 prompts × 2 samples × 8 tokens, 2 minibatches. SGD, not Adam: Adam's g/(|g| + eps)
turns the rounding of near-zero gradients (sharded sums reorder them) into lr-sized steps, which
says nothing about whether the sharded program is right.
"""
import jax
import numpy as np
import optax

from rmjax import objectives, parallel
from rmjax.models import transformer
from rmjax.models.config import get_size
from rmjax.models.reward_model import RewardModel
from rmjax.rl import iteration as it
from rmjax.rl import population, trainer
from rmjax.train import state as state_lib

SECTION = dict(reward='mean,kl_penalty', kl_penalty=dict(beta=0.05), advantage='gae', loss='ppo_clip,value')
METRICS = ('reward/raw', 'kl/k1', 'kl/exact', 'entropy', 'loss', 'grad_norm', 'advantage_mean')
NUM_PROMPTS = 8


def prompts():
  """8 left-padded prompts of 3-8 tokens in width 8."""
  rng = np.random.default_rng(1)
  lens = rng.integers(3, 9, NUM_PROMPTS)
  mask = np.arange(8)[None] >= (8 - lens)[:, None]
  return {'prompt_tokens': np.where(mask, rng.integers(3, 512, (NUM_PROMPTS, 8)), 0).astype(np.int32),
          'prompt_mask': mask}


CFG = get_size('tiny')
SETTINGS = it.Settings(group_size=2, max_new_tokens=8, temperature=0.7, top_k=32, eos_id=1, pad_id=0, minibatches=2)
OPTIMIZER = optax.sgd(0.1)
REWARD_MODEL = RewardModel(CFG, num_members=2, kind='full')


def init_state(policy_key, state_key):
  """A fresh RL state whose policy (the reference's copy) comes from `policy_key`."""
  policy = transformer.init_lm(policy_key, CFG)
  return it.init_state(it.init_params(jax.random.key(2), policy, CFG), OPTIMIZER, state_key, objectives.build(SECTION))


class Case:
  """State shardings, placed frozen models and the jitted iteration on `mesh`."""

  def __init__(self, mesh):
    self.mesh = mesh
    self.init = lambda: init_state(jax.random.key(1), jax.random.key(3))
    self.abstract = jax.eval_shape(self.init)
    self.shardings = state_lib.state_shardings(self.abstract, OPTIMIZER, mesh)
    self.target = state_lib.with_shardings(self.abstract, self.shardings)
    policy = transformer.init_lm(jax.random.key(1), CFG)
    self.frozen = trainer.place_frozen(
        it.Frozen(ref_params=policy, reward_params=REWARD_MODEL.init(jax.random.key(4))), mesh)
    fns = it.make_functions(CFG, SECTION, SETTINGS, REWARD_MODEL.apply, OPTIMIZER, value_config=CFG)
    self.step = jax.jit(fns.iteration_samples, donate_argnums=(0,), out_shardings=(self.shardings, None, None))

  def fresh(self):
    return jax.jit(self.init, out_shardings=self.shardings)()

  def run(self, state, process_index=0, process_count=1):
    """One iteration on this process's contiguous share of the prompts: (state, metrics, tokens [8·2, 16])."""
    n = NUM_PROMPTS // process_count
    local = {k: v[process_index * n:(process_index + 1) * n] for k, v in prompts().items()}
    state, metrics, samples = self.step(state, self.frozen, parallel.global_batch(local, self.mesh))
    metrics = jax.device_get(metrics)
    return state, {k: float(metrics[k]) for k in METRICS}, samples.tokens


class PopulationCase:
  """The same iteration for a population of 2 (`rmjax.rl.population`): fresh policies of two seeds,
  each its own reference (stacked), KL coefficients 0.02 and 0.1, sharded by `population_shardings`."""

  BETA = 'objective.kl_penalty.beta'

  def __init__(self, mesh):
    self.mesh = mesh
    policy_keys, state_keys = jax.random.split(jax.random.key(1)), jax.random.split(jax.random.key(3))
    values = {self.BETA: np.asarray([0.02, 0.1], np.float32)}
    self.init = lambda: population.PopulationState(jax.vmap(init_state)(policy_keys, state_keys), values)
    self.shardings = population.population_shardings(jax.eval_shape(self.init), OPTIMIZER, mesh)
    refs = jax.vmap(lambda k: transformer.init_lm(k, CFG))(policy_keys)
    self.frozen = trainer.place_frozen(it.Frozen(ref_params=refs, reward_params=REWARD_MODEL.init(jax.random.key(4))),
                                       mesh, ref_population=True)
    iteration, _ = population.make_population_functions(CFG, SECTION, SETTINGS, REWARD_MODEL.apply, OPTIMIZER,
                                                        value_config=CFG, ref_axis=0)
    self.step = jax.jit(iteration, donate_argnums=(0,), out_shardings=(self.shardings, None, None))

  def run(self):
    """One iteration from the fresh population: (state, metrics {name: [P]}, tokens [P, 8·2, 16])."""
    state = jax.jit(self.init, out_shardings=self.shardings)()
    state, metrics, samples = self.step(state, self.frozen, parallel.global_batch(prompts(), self.mesh))
    metrics = jax.device_get(metrics)
    return state, {k: np.asarray(metrics[k]).tolist() for k in METRICS}, samples.tokens
