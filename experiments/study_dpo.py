"""The study's DPO stage: DPO on the proxies' preference pairs at several β, scored like RL.

For each β of `dpo.betas` and each of `dpo.seeds` seeds, `rmjax.rl.dpo` trains the base policy
(also the frozen reference) on the study's training pairs — the pairs the proxies learn from,
with the same flipped labels — for `dpo.steps` steps, checkpointing every `dpo.eval_every`
steps from step 0; all runs are members of one vmapped population (`dpo.run_population`,
member i's checkpoints in `train/members/<i>/`). Each checkpoint is rolled out on the held-out prompts exactly as the RL
stages' held-out evaluation (`rmjax.rl.score.policy_evaluator`: `rl.group_size` samples per
prompt, the sequence KL Σ_t (log π − log π_ref) to the base policy, the single proxy's and the
gold network's scores), and written in the RL trainer's layout (`rollouts/<step>.jsonl`,
`metrics.jsonl`), so `study_rl.member_curve` makes its curve. DPO optimizes no proxy: its
`proxy_reward` is the single proxy's, for comparison. Both of Gao et al.'s forms are fitted and
the one with the higher R² is kept (`fits[...]['form']`).
"""
from __future__ import annotations

import pathlib
import shutil

import ml_collections

from rmjax import config as config_lib
from rmjax.eval import fits
from rmjax.rl import dpo as dpo_lib
from rmjax.rl import score, trainer
from rmjax.train import checkpoint
from rmjax.train.metrics import MetricsWriter

from experiments import study_rl

METHOD = 'dpo'


def members(config) -> list[tuple[int, float]]:
  """(seed, β) of each DPO run: `dpo.seeds` seeds derived from the study's seed, per β."""
  return [(1000 * int(config.seed) + 500 + i, float(b)) for b in config.dpo.betas for i in range(int(config.dpo.seeds))]


def dpo_config(config, policy_dir: pathlib.Path, pairs_dir: pathlib.Path):
  """The DPO trainer's config: every run of `members` in one population (module docstring)."""
  d = config.dpo
  c = dpo_lib.get_config('tiny')
  runs = members(config)
  c.seed = runs[0][0]
  c.population.update(dict(seeds=','.join(str(s) for s, _ in runs),
                           hparams='objective.dpo.beta=' + ','.join(repr(b) for _, b in runs)))
  c.policy.path = str(policy_dir / 'checkpoints')
  c.data.update(dict(source='tfds', path=str(pairs_dir), seq_len=int(config.data.seq_len),
                     batch_size=int(d.batch_size), eval_batch_size=int(d.batch_size)))
  c.objective.dpo = dict(beta=runs[0][1], label_smoothing=0.0)
  c.optim = config_lib.optim(lr=float(d.lr), warmup_steps=0, schedule='constant', weight_decay=0.0)
  c.train = config_lib.train(int(d.steps), log_every=int(d.eval_every), eval_every=int(d.eval_every),
                             checkpoint_every=int(d.eval_every))
  c.train.keep = int(d.steps) // int(d.eval_every) + 1  # every checkpoint is scored
  c.train.save_initial = True
  c.train.progress = bool(d.progress)
  return c


def validate(config) -> None:
  """Checks `config.dpo` before anything compiles."""
  C = config_lib
  if not config.dpo.betas:
    return
  C.require_positive(config, 'dpo.seeds', 'dpo.steps', 'dpo.eval_every', 'dpo.batch_size', 'dpo.lr')
  if any(float(b) <= 0 for b in config.dpo.betas):
    raise C.ConfigError(f'config.dpo.betas={tuple(config.dpo.betas)}: every β must be > 0.')
  if config.dpo.steps % config.dpo.eval_every:
    raise C.ConfigError(f'config.dpo.steps={config.dpo.steps} must be a multiple of '
                        f'dpo.eval_every={config.dpo.eval_every} (curves are read at every checkpoint).')


def run(config, folder: pathlib.Path, dirs: dict, reward_fn, gold) -> list[dict]:
  """Stage `dpo`: trains (or resumes) and scores every run in `folder`; returns their curves.

  dirs: the `policy`, `gold`, `reward` (the proxies) and `pairs` stage folders; reward_fn, gold:
  as for `study_rl.run`.
  """
  rl = study_rl.rl_config(config, study_rl.SINGLE, dirs['policy'], dirs['gold'], dirs['reward'])
  rl.score = ml_collections.ConfigDict(dict(reference=str(dirs['policy'] / 'checkpoints')))
  setup = trainer.build(rl)
  evaluate_policy = score.policy_evaluator(rl, setup, trainer.frozen_models(setup, None))
  dpo_lib.run(dpo_config(config, dirs['policy'], dirs['pairs']), str(folder / 'train'))
  curves = []
  for i, (seed, beta) in enumerate(members(config)):
    member, trained = folder / 'members' / str(i), folder / 'train' / 'members' / str(i) / 'checkpoints'
    steps = checkpoint.saved_steps(trained)
    if not (member / 'metrics.jsonl').exists():  # scored once; a killed scoring starts over
      scoring = member / 'scoring'
      shutil.rmtree(scoring, ignore_errors=True)
      with MetricsWriter(scoring, tensorboard=False) as writer:
        for step in steps:
          metrics, samples = evaluate_policy(str(trained / str(step)))
          trainer.write_rollouts(member / 'rollouts' / f'{step}.jsonl', samples, trainer.rollout_prompt_ids(setup),
                                 int(rl.data.prompt_len), setup.tok)
          writer.write(step, {f'eval/{k}': v for k, v in metrics.items()})
      (scoring / 'metrics.jsonl').replace(member / 'metrics.jsonl')
      shutil.rmtree(scoring)
    curve = study_rl.member_curve(study_rl.SINGLE, member, seed, beta, int(config.rl.group_size), reward_fn, gold,
                                  ensemble=None)
    curve.update(method=METHOD, optimizer=METHOD)
    curve['fits'] = {key: fits.best(curve['kl'], curve[f'{key}_reward']) for key in ('gold', 'proxy')}
    curves.append(curve)
  return curves
