"""The reward-model job: build a small synthetic world, then train a K=4 reward-model ensemble on it.

`python -m rmjax.main --config=configs/rm.py --workdir=DIR` (default `tiny`).
Stages (each kept in DIR and skipped when done): a policy pretrained on the built-in
synthetic language; a larger gold reward model; preference pairs sampled from the policy and
labeled by the gold's ordering; the reward-model ensemble trained on them, normalized, and
evaluated against the gold's noiseless ordering.

Variants: `tiny` (the quickstart, a few minutes on a laptop CPU), `test` (seconds, for the
tests), `small` (the `small` model shape).
"""
import ml_collections

from experiments import rm_world
from rmjax import config as C

VARIANTS = ('tiny', 'test', 'small')


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f'configs/rm.py: unknown variant {arg!r}; choose one of {VARIANTS}.')
  c = ml_collections.ConfigDict()
  c.job = 'experiments.rm_world:run'
  c.seed = 0

  c.world = rm_world.world_config(arg)
  c.data = rm_world.data_config(arg)

  # The reward-model ensemble.
  c.model = C.model('tiny')
  c.ensemble = ml_collections.ConfigDict(dict(kind='full', members=4, bootstrap=False))
  c.loss = ml_collections.ConfigDict(dict(name='bradley_terry', margin=0.0, label_smoothing=0.0))
  c.optim = C.optim(lr=1e-3, warmup_steps=20)
  c.train = C.train(400, batch_size=32, log_every=25, eval_every=100, checkpoint_every=100)
  c.train.grad_accum_steps = 'auto'  # on one CPU device: microbatches of 1024 tokens (accumulate.auto_steps)
  c.eval = ml_collections.ConfigDict(dict(batch_size=128, aggregate='mean'))
  c.mesh = C.mesh()

  if arg == 'test':
    c.model = C.model('tiny', width=32, mlp_width=64, num_layers=1, num_heads=2, num_kv_heads=1)
    c.ensemble.members = 2
    c.train = C.train(24, batch_size=16, log_every=8, eval_every=12, checkpoint_every=8)
    c.eval.batch_size = 32
  elif arg == 'small':
    c.world.policy.model = C.model('small')
    c.world.gold = C.model('small', width=384, mlp_width=1024, num_layers=8, num_heads=8, num_kv_heads=4)
    c.model = C.model('small')
  return c
