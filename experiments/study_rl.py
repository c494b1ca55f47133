"""The study's RL stages: RLOO against each objective, seeds × KL coefficients as one population.

For objective `name` (`experiments/overoptimization.py`), `rl_config` makes the config of the
RL trainer (`rmjax.rl.trainer`, run as a vmapped population by `rmjax.rl.population`): the base
policy as the initial policy and frozen reference, the proxies' checkpoint as the reward (member
0 alone for `single`; member 0 through log σ(r̃ − r_ref(x)) for `log_sigmoid`; the weight-averaged
model for `warm`; the objective's aggregation of every normalized member otherwise) with a
per-token KL penalty β·(log π − log π_ref) in the reward, the gold's network as the gold scorer
(the curves add its fluency part), and population members `rl.seeds` seeds × `rl.kl_coefs`
values of β. Training prompts are the world's prompts; the held-out prompts are those of best-of-n (the next `bon.num_prompts` of the
grammar). Every `rl.eval_every` iterations, starting at iteration 0 (the base policy), and at
the iterations of `rl.extra_evals`, each member checkpoints, evaluates on the held-out prompts
and writes its rollouts.

`curves` reads, per member and saved step, the held-out sequence KL Σ_t (log π − log π_ref)
averaged over rollouts (`eval/kl/k1`), and from the rollouts the gold and the objective's proxy
reward, both relative to step 0 (R(0) = 0) and averaged per prompt (95% bootstrap intervals over
prompts), with the fits R(d) = d(α − β log d), d = √KL (Gao et al.).
"""
from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np

from rmjax import config as config_lib
from rmjax.eval import fits
from rmjax.rl import population, trainer
from rmjax.train.metrics import read_metrics

SINGLE, WARM = 'single', 'warm'  # the one-model objectives: member 0 of the ensemble; its weight average
LOG_SIGMOID = 'log_sigmoid'  # log σ(r̃_0 − r_ref(x)) on the single proxy (Wang et al. 2024)
ONE_MODEL = (SINGLE, WARM, LOG_SIGMOID)


def member_seeds(config) -> list[int]:
  """`rl.seeds` RL seeds derived from the study's seed (so `--config.seed` reseeds RL too)."""
  return [1000 * int(config.seed) + i for i in range(int(config.rl.seeds))]


def rl_config(config, name: str, policy_dir: pathlib.Path, gold_dir: pathlib.Path,
              reward_dir: pathlib.Path, ref_samples: pathlib.Path | None = None) -> ml_collections.ConfigDict:
  """The RL trainer's config for objective `name` (see the module docstring); `reward_dir`: the
  `proxies` stage's folder, or the `warm` stage's for `warm`; `ref_samples`: for `log_sigmoid`, the
  `.npy` of the single proxy's normalized rewards of base-policy samples per prompt id."""
  r = config.rl
  c = trainer.base_config('rloo', 'tiny')
  c.seed = int(config.seed)
  c.policy.path = str(policy_dir / 'checkpoints')
  c.reward.path = str(reward_dir / 'checkpoints')
  c.reward.members = '0' if name in (SINGLE, LOG_SIGMOID) else ''
  c.reward.ref_samples = str(ref_samples) if name == LOG_SIGMOID else ''
  c.gold.path = str(gold_dir)
  c.data.update(dict(seed=int(config.seed), num_prompts=int(config.world.num_prompts),
                     num_eval=int(config.bon.num_prompts), prompt_len=int(r.prompt_len),
                     prompts_per_iteration=int(r.prompts_per_iteration)))
  c.rl.update(dict(group_size=int(r.group_size), max_new_tokens=int(config.data.max_new_tokens),
                   temperature=float(config.data.temperature), epochs=int(r.epochs), minibatches=int(r.minibatches)))
  c.objective = ml_collections.ConfigDict({
      'reward': {SINGLE: 'mean', WARM: 'mean', LOG_SIGMOID: 'mean,log_sigmoid'}.get(name, name) + ',kl_penalty',
      'kl_penalty': {'beta': 0.0},
      'advantage': 'rloo', 'rloo': {'group_size': int(r.group_size)}, 'loss': 'ppo_clip'})
  if name not in ONE_MODEL and name in config:
    c.objective[name] = config[name].to_dict()
  if name == LOG_SIGMOID:
    c.objective.log_sigmoid = {'ref': 'quantile', 'q': float(config.log_sigmoid.q)}
  c.optim = config_lib.optim(lr=float(r.lr), warmup_steps=0, schedule='constant', weight_decay=0.0)
  c.train = config_lib.train(int(r.iterations), log_every=int(r.eval_every), eval_every=int(r.eval_every),
                             checkpoint_every=int(r.eval_every))
  c.train.save_initial = True
  c.train.extra_steps = tuple(int(s) for s in r.extra_evals)
  c.train.keep = 1
  c.train.progress = bool(r.progress)
  seeds, betas = member_seeds(config), [float(b) for b in r.kl_coefs]
  c.population.seeds = ','.join(str(s) for _ in betas for s in seeds)
  c.population.hparams = 'objective.kl_penalty.beta=' + ','.join(str(b) for b in betas for _ in seeds)
  return c


def validate(config) -> None:
  """Checks `config.rl` before anything compiles."""
  C = config_lib
  C.require_positive(config, 'rl.seeds', 'rl.iterations', 'rl.eval_every', 'rl.prompts_per_iteration',
                     'rl.group_size', 'rl.prompt_len', 'rl.epochs', 'rl.minibatches', 'rl.lr')
  if config.rl.iterations % config.rl.eval_every:
    raise C.ConfigError(f'config.rl.iterations={config.rl.iterations} must be a multiple of '
                        f'rl.eval_every={config.rl.eval_every} (curves are read at every evaluation).')
  bad = [s for s in config.rl.extra_evals if not isinstance(s, int) or not 0 < s < config.rl.iterations]
  if bad:
    raise C.ConfigError(f'config.rl.extra_evals: {bad} are not iterations in 1..rl.iterations-1='
                        f'{config.rl.iterations - 1}.')
  if not config.rl.kl_coefs or any(float(b) < 0 for b in config.rl.kl_coefs):
    raise C.ConfigError(f'config.rl.kl_coefs={tuple(config.rl.kl_coefs)}: give one or more coefficients >= 0.')
  if config.rl.prompt_len + config.data.max_new_tokens > config.data.seq_len:
    raise C.ConfigError(f'config.rl.prompt_len + data.max_new_tokens = '
                        f'{config.rl.prompt_len + config.data.max_new_tokens} exceeds data.seq_len='
                        f'{config.data.seq_len}, the width the proxies were trained on.')


def run(config, folder: pathlib.Path, name: str, dirs: dict, reward_fn, gold, ensemble: str | None) -> list[dict]:
  """Stage `rl_<name>`: trains (or resumes) the population in `folder`; returns its curves.

  dirs: the `policy`, `gold` and `reward` stage folders and, for `log_sigmoid`, `ref_samples`
  (`rl_config`). reward_fn(name, members [K, P, N]) ->
  the objective's reward `[P, N]` (as for best-of-n). gold: the `rm_world.Gold` (the trainer
  scores rollouts with its network part z; the curves add the fluency part). ensemble: the
  curves' `ensemble` field (None, 'finetune' or 'pretrain').
  """
  c = rl_config(config, name, dirs['policy'], dirs['gold'], dirs['reward'], dirs.get('ref_samples'))
  population.run(c, str(folder))
  members = population.parse_members(c)
  group = int(config.rl.group_size)
  return [member_curve(name, folder / 'members' / str(i), m.seed, m.values['objective.kl_penalty.beta'],
                       group, reward_fn, gold, ensemble) for i, m in enumerate(members)]


def _rollouts(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def member_curve(name: str, member_dir: pathlib.Path, seed: int, beta: float, group: int, reward_fn,
                 gold, ensemble: str | None) -> dict:
  """One member's RL curve over its saved steps (module docstring)."""
  kl_at = {int(r['step']): r['eval/kl/k1'] for r in read_metrics(member_dir / 'metrics.jsonl') if 'eval/kl/k1' in r}
  steps = sorted(int(p.stem) for p in (member_dir / 'rollouts').glob('*.jsonl'))
  if not steps or steps[0] != 0 or any(s not in kl_at for s in steps):
    raise RuntimeError(f'{member_dir}: rollouts at steps {steps} and evaluations at {sorted(kl_at)} do not line up; '
                       'rerun the stage with --redo.')
  per_step = {'proxy': [], 'gold': [], 'length': [], 'grammatical': []}
  texts = {}
  for s in steps:
    rows = _rollouts(member_dir / 'rollouts' / f'{s}.jsonl')
    scores = np.asarray([r['scores'] for r in rows], np.float64).T  # [K, R]
    n_prompts = scores.shape[1] // group
    proxy = reward_fn(name, scores.reshape(scores.shape[0], n_prompts, group))  # [P, group]
    per_step['proxy'].append(proxy.mean(1))
    responses = [r['text'] for r in rows]
    full_gold = gold.from_net(np.asarray([r['gold'] for r in rows]), responses)
    per_step['gold'].append(full_gold.reshape(n_prompts, group).mean(1))
    per_step['length'].append(np.mean([len(r['tokens']) for r in rows]))
    per_step['grammatical'].append(np.mean([gold.grammar.grammatical_share(t) for t in responses]))
    texts[s] = [dict(r, gold=float(v)) for r, v in zip(rows, full_gold)]
  curve = {'method': name, 'optimizer': 'rl', 'ensemble': ensemble,
           'kl_coef': beta, 'seed': seed, 'step': steps, 'kl': [float(kl_at[s]) for s in steps],
           **{key: [float(x) for x in per_step[key]] for key in ('length', 'grammatical')}}
  for key in ('proxy', 'gold'):
    values = np.stack(per_step[key], axis=1)  # [P, steps]
    mean, lo, hi = fits.bootstrap_ci(values - values[:, :1], axis=0, seed=seed)
    curve[f'{key}_reward'], curve[f'{key}_reward_ci'] = mean.tolist(), [lo.tolist(), hi.tolist()]
  curve['fits'] = {key: fits.fit(curve['kl'], curve[f'{key}_reward'], 'rl') for key in ('gold', 'proxy')}
  curve['examples'] = [
      {'prompt': r['prompt'], 'which': f'step {s}', 'response': r['text'], 'gold': float(r['gold'])}
      for s in (steps[0], steps[-1]) for r in texts[s][:2 * group:group]]
  return curve
