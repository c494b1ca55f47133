"""The reward-overoptimization study on the embedded synthetic world (`experiments/overoptimization.py`).

`python -m rmjax.main --config=configs/study/overoptimization.py:default --workdir=DIR [--redo=STAGE]`

Variants: `smoke` (under two minutes, for the tests), `default` (the core comparison on a
laptop CPU), `medium` (the full method set: WARM, pretrain-seed ensembles, `mean_minus_std`,
`log_sigmoid`, DPO, proxies at three sizes and two data sizes; more prompts and samples; 5 RL seeds).
"""
import ml_collections

from experiments import rm_world
from rmjax import config as C

VARIANTS = ('smoke', 'default', 'medium')


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f'configs/study/overoptimization.py: unknown variant {arg!r}; choose one of {VARIANTS}.')
  c = ml_collections.ConfigDict()
  c.job = 'experiments.overoptimization:run'
  c.seed = 0

  # 1. World: the synthetic language, a base policy pretrained on it, the gold reward model.
  c.world = rm_world.world_config()
  # 2. Preference pairs from the base policy, labeled by the gold's ordering, 25% flipped (Coste et al.).
  c.data = rm_world.data_config(flip_prob=0.25)
  # The pair count sets how well the proxies learn the gold: with 1024 pairs they agree with its
  # noiseless ordering at 0.59-0.63 (seed 0), below the 65-85% of Gao et al.'s setting.
  c.data.num_train = 2048

  # 3. Proxy reward models: a K-member finetune-seed ensemble on the policy's pretrained backbone;
  # the single proxy is its member 0 (trained exactly as alone: the optimizer runs per member).
  c.proxy = ml_collections.ConfigDict()
  c.proxy.model = C.model('tiny')
  c.proxy.members = 4
  c.proxy.loss = ml_collections.ConfigDict(dict(name='bradley_terry', margin=0.0, label_smoothing=0.0))
  c.proxy.optim = C.optim(lr=1e-3, warmup_steps=20)
  c.proxy.train = C.train(300, batch_size=32, log_every=25, eval_every=100, checkpoint_every=100)
  c.proxy.eval_batch_size = 128

  # A pretrain-seed ensemble (Eisenstein et al.): members on LMs pretrained from different seeds
  # (0 = none; `:medium` builds one), with the aggregations applied to it under best-of-n and RL.
  c.pretrain = ml_collections.ConfigDict(dict(members=0, objectives=('mean', 'wco', 'uwo'), rl_objectives=()))

  # 4. Objectives optimized against, by name: the registry's aggregations of the members, 'single'
  # (member 0 alone) and 'warm' (the members' weight average, Ramé et al.).
  c.objectives = ('single', 'mean', 'wco', 'uwo')
  c.uwo = ml_collections.ConfigDict(dict(lam=0.5))
  c.mean_minus_std = ml_collections.ConfigDict(dict(k=1.0))
  # log σ(r̃ − r_ref(x)) on the single proxy (Wang et al. 2024), RL only: r_ref(x) is the q-quantile
  # of the proxy's rewards of `ref_samples` base-policy samples of prompt x.
  c.log_sigmoid = ml_collections.ConfigDict(dict(q=0.5, ref_samples=8))

  # 5. Best-of-n: N samples per held-out prompt drawn once; curves for n = 1, 2, 4, ..., n_max.
  c.bon = ml_collections.ConfigDict(dict(num_prompts=64, samples=256, n_max=256, batch=512))

  # 6. RL: RLOO against each objective; seeds x KL-penalty coefficients as one vmapped population
  # per objective, evaluated on the best-of-n prompts every eval_every iterations (from 0) and at
  # the extra_evals iterations (without a penalty the KL reaches ~9 by iteration 5, so the early
  # iterations resolve the start of the curve).
  c.rl = ml_collections.ConfigDict(dict(
      objectives=('single', 'mean', 'wco', 'uwo'), seeds=2, kl_coefs=(0.0, 0.05), iterations=60, eval_every=5,
      extra_evals=(1, 2, 3, 4), prompts_per_iteration=8, group_size=4, prompt_len=40, epochs=1, minibatches=2,
      lr=3e-4, progress=True))

  # 7. DPO on the same training pairs at each β (none here: `:medium` runs it), scored like RL.
  c.dpo = ml_collections.ConfigDict(dict(betas=(), seeds=2, steps=150, eval_every=25, batch_size=32, lr=3e-4,
                                         progress=True))

  # 8. Proxy size and data size (Gao et al.'s scaling): single proxies of each (width, layers) in
  # `sizes.models` — tiny's proportions, each on a language model of its size pretrained like the
  # policy — trained on the first n training pairs for each n in `sizes.num_train` (steps scaled so
  # every n gets as many passes over its pairs), scored on the best-of-n samples; best-of-n α and β
  # against proxy size. None here; `:medium` runs 3 sizes x 2 data sizes.
  c.sizes = ml_collections.ConfigDict(dict(models=(), num_train=()))

  c.mesh = C.mesh()

  if arg == 'smoke':
    c.world = rm_world.world_config('test')
    c.world.policy.train = C.train(30, batch_size=16, log_every=10, checkpoint_every=15)
    c.world.gold = C.model('tiny', width=48, mlp_width=96, num_layers=2, num_heads=2, num_kv_heads=1)
    c.data = rm_world.data_config('test', flip_prob=0.25)
    c.proxy.model = C.model('tiny')
    c.proxy.members = 2
    c.proxy.train = C.train(20, batch_size=16, log_every=10, eval_every=10, checkpoint_every=10)
    c.proxy.eval_batch_size = 32
    c.bon = ml_collections.ConfigDict(dict(num_prompts=8, samples=32, n_max=16, batch=128))
    c.objectives = ('single', 'mean', 'wco', 'uwo', 'warm')
    c.rl.update(dict(objectives=('warm', 'log_sigmoid', 'uwo'), seeds=1, iterations=4, eval_every=2,
                     extra_evals=(1,), prompts_per_iteration=4, group_size=2, prompt_len=32, progress=False))
    c.dpo.update(dict(betas=(0.1,), seeds=1, steps=4, eval_every=2, batch_size=16, progress=False))
    c.pretrain.update(dict(members=2, objectives=('mean',)))
    c.sizes.update(dict(models=((32, 1), (64, 2)), num_train=(128, 256)))
  elif arg == 'medium':
    c.objectives = ('single', 'mean', 'wco', 'uwo', 'mean_minus_std', 'median', 'warm')
    c.rl.objectives = ('single', 'mean', 'wco', 'uwo', 'mean_minus_std', 'warm', 'log_sigmoid')
    c.dpo.betas = (0.05, 0.1, 0.5)
    c.pretrain.update(dict(members=4, objectives=('mean', 'wco', 'uwo', 'mean_minus_std'),
                           rl_objectives=('mean', 'uwo')))
    c.bon.update(dict(num_prompts=128, samples=512, n_max=512))
    c.rl.seeds = 5
    c.rl.extra_evals = ()  # every 5 iterations only, as in the results of docs/studies.md
    c.dpo.seeds = 3
    c.sizes.update(dict(models=((32, 1), (64, 2), (96, 3)), num_train=(1024, 2048)))
  return c
