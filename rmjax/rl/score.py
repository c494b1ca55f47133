"""Re-scoring without retraining (`configs/score.py`): saved policies or saved rollouts under another
reward model or objective.

`python -m rmjax.main --config=configs/score.py --workdir=DIR --config.reward.path=RM
  --config.score.policies=RUN_A/checkpoints,RUN_B/members/0/checkpoints
  --config.score.rollouts=RUN_A/rollouts [--config.gold.path=GOLD] [--config.objective.reward=uwo ...]`

Policies (`score.policies`, comma-separated checkpoint folders of any policy kind: base, RL, DPO,
population member): each is rolled out on the RL trainer's held-out prompts (`config.data`, the
sampling settings of `config.rl`, key `fold_in(key(seed), 4)`) and scored exactly as the RL
trainer's held-out evaluation scores (`rmjax.rl.iteration`'s `evaluate`: the reward model(s) of
`config.reward`, re-tokenized where the tokenizers differ, the reward chain of
`config.objective.reward`, the KL to `score.reference` — a policy checkpoint; '' = the policy
itself, KL 0 — and, with `config.gold.path`, the gold reward and its rank correlation with the
proxy).

Rollouts (`score.rollouts`, comma-separated `rollouts/<step>.jsonl` files or folders of them, as
the RL trainer writes): the saved token ids are scored again (ids of the tokenizer in the run's
`checkpoints/` metadata, re-tokenized for the reward model where needed) in fixed-shape batches
of `score.batch_size` rows; the chain `config.objective.reward` is applied to the `[K, B]` scores
with the reward model's normalization (aggregations and transforms that read no log-probs: a KL
penalty needs the policy and is refused). Per row, `DIR/rescored/<n>_<file name>` gets the new
scores.

Writes `DIR/scores.jsonl` (one row per source: `source`, `kind`, `step`, metrics) and
`DIR/scores.md` (the same as a table); returns the rows.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.objectives import RewardContext
from rmjax.rl import iteration as it
from rmjax.rl import trainer
from rmjax.train import checkpoint

TABLE_KEYS = ('reward/raw', 'reward/proxy', 'reward/transformed', 'reward/member_spread', 'reward/gold',
              'reward/proxy_gold_spearman', 'kl/exact', 'kl/k1', 'response_length', 'eos_fraction')


def _paths(spec: str) -> list[str]:
  return [p.strip() for p in spec.split(',') if p.strip()]


def _rollout_files(spec: str) -> list[pathlib.Path]:
  out = []
  for p in map(pathlib.Path, _paths(spec)):
    if p.is_dir():
      found = sorted(p.glob('*.jsonl'), key=lambda f: (len(f.stem), f.stem))
      if not found:
        raise config_lib.ConfigError(f'config.score.rollouts: {p} holds no .jsonl files.')
      out += found
    elif p.is_file():
      out.append(p)
    else:
      raise config_lib.ConfigError(f'config.score.rollouts: no file or folder at {p}.')
  return out


def validate(config) -> None:
  """Checks the score sections before anything compiles."""
  if not config.score.policies and not config.score.rollouts:
    raise config_lib.ConfigError('config.score: give policies (checkpoint folders) and/or rollouts (JSONL files).')
  config_lib.require_positive(config, 'score.batch_size', 'rl.group_size', 'rl.max_new_tokens', 'data.num_eval',
                              'data.prompt_len')
  if config.score.rollouts:
    _rollout_files(config.score.rollouts)
  try:
    objectives.build(config.objective)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.objective: {e}') from e


def _eval_section(config) -> dict:
  """The objective for `evaluate`: the config's reward chain, with a placeholder update rule."""
  section = config.objective.to_dict()
  if 'advantage' not in section:
    section['advantage'] = 'reinforce'
  if 'loss' not in section:
    section['loss'] = 'ppo_clip'
  return section


def policy_evaluator(config, setup: trainer.Setup, frozen_base: it.Frozen):
  """`evaluate_policy(path) -> (metrics, samples)`: the held-out rollout of the policy checkpoint at
  `path`, scored as the RL trainer's held-out evaluation (see the module docstring)."""
  section = _eval_section(config)
  # `evaluate` never updates; the optimizer only completes the signature.
  optimizer, objective = optax.sgd(0.0), objectives.build(section)
  fns = it.make_functions(setup.policy_cfg, section, setup.settings, setup.scorer, optimizer,
                          gold_scorer=setup.gold_scorer)
  evaluate = jax.jit(fns.evaluate)
  ref = None
  if config.score.reference:
    ref, ref_cfg, _ = trainer.load_policy(config.score.reference)
    if ref_cfg != setup.policy_cfg:
      raise config_lib.ConfigError(f'config.score.reference={config.score.reference!r} has another model shape '
                                   'than the policies.')
  held_out = parallel.global_batch(setup.held_out, setup.mesh)

  def evaluate_policy(path: str):
    params, cfg, _ = trainer.load_policy(path)
    if cfg != setup.policy_cfg:
      raise config_lib.ConfigError(f'{path}: the policy has another model shape than the first policy.')
    state = it.init_state({'policy': params}, optimizer, jax.random.key(0), objective)
    frozen = frozen_base._replace(ref_params=params if ref is None else ref)
    metrics, samples = evaluate(state, frozen, held_out, trainer.eval_key(int(config.seed)))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, samples
  return evaluate_policy


def score_policies(config, setup: trainer.Setup, frozen_base: it.Frozen) -> list[dict]:
  """One table row per policy checkpoint of `config.score.policies` (see the module docstring)."""
  evaluate_policy = policy_evaluator(config, setup, frozen_base)
  rows = []
  for path in _paths(config.score.policies):
    m, _ = evaluate_policy(path)
    _, meta = checkpoint.load(path)
    rows.append(dict(source=path, kind='policy', step=meta.get('data_step'),
                     **{k: m[k] for k in TABLE_KEYS if k in m}))
  return rows


def _run_tokenizer(file: pathlib.Path):
  """The tokenizer of the run that wrote `RUN/rollouts/<step>.jsonl` (its checkpoints' metadata), else bytes."""
  ckpts = file.parent.parent / 'checkpoints'
  if ckpts.is_dir():
    _, meta = checkpoint.load(ckpts)
    return trainer.policy_tokenizer(meta.get('tokenizer', {}))
  return trainer.policy_tokenizer({})


def score_rollouts(config, workdir: pathlib.Path) -> list[dict]:
  """One table row per rollout file of `config.score.rollouts`; per-row scores under `workdir/rescored/`."""
  objective = objectives.build(config.objective)
  if objective.reward is None:
    raise config_lib.ConfigError("config.objective.reward is empty; give at least an aggregation, e.g. 'mean'.")
  rows, bs = [], int(config.score.batch_size)
  for n, file in enumerate(_rollout_files(config.score.rollouts)):
    tok = _run_tokenizer(file)
    saved = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not saved:
      raise config_lib.ConfigError(f'config.score.rollouts: {file} has no rows.')
    lp = max(len(r['prompt_tokens']) for r in saved)
    nt = max(max(len(r['tokens']) for r in saved), 1)
    scorer, reward_params, stats = trainer.reward_scorer(config.reward, tok, lp, nt)
    gold = None
    if config.gold.path:
      gold_scorer, gold_params, _ = trainer.reward_scorer(config.gold, tok, lp, nt, normalized=True)
      gold = jax.jit(lambda t, m: gold_scorer(gold_params, t, m).mean(0))

    @jax.jit
    def chain(t, m):
      scores = scorer(reward_params, t, m)
      reward, _ = objective.apply_reward(scores, objective.init_reward_state(), RewardContext(stats=stats))
      return scores, objectives.normalize(scores, stats).mean(0), reward

    prompts, _ = trainer.left_pad([r['prompt_tokens'] for r in saved], lp, tok.pad_id)
    pmask = np.zeros_like(prompts, bool)
    for i, r in enumerate(saved):
      pmask[i, lp - len(r['prompt_tokens']):] = True
    resp = np.full((len(saved), nt), tok.pad_id, np.int32)
    rmask = np.zeros((len(saved), nt), bool)
    for i, r in enumerate(saved):
      resp[i, :len(r['tokens'])], rmask[i, :len(r['tokens'])] = r['tokens'], True
    tokens, mask = np.concatenate([prompts, resp], 1), np.concatenate([pmask, rmask], 1)
    pad = -len(saved) % bs   # fixed shapes: the last batch is filled with copies of the first row
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    out = {'scores': [], 'proxy': [], 'reward': [], 'gold': []}
    for start in range(0, len(tokens), bs):
      t, m = tokens[start:start + bs], mask[start:start + bs]
      scores, proxy, reward = jax.device_get(chain(t, m))
      out['scores'].append(scores)
      out['proxy'].append(proxy)
      out['reward'].append(reward)
      if gold is not None:
        out['gold'].append(np.asarray(gold(t, m)))
    k = len(saved)
    scores = np.concatenate(out['scores'], 1)[:, :k]
    proxy, reward = np.concatenate(out['proxy'])[:k], np.concatenate(out['reward'])[:k]
    if reward.shape != (k,):
      raise config_lib.ConfigError(f'config.objective.reward gives shape {reward.shape} per batch; re-scoring '
                                   'rollouts needs a sequence reward [B] (an aggregation and transforms).')
    row = dict(source=str(file), kind='rollouts', step=int(file.stem) if file.stem.isdigit() else None,
               **{'reward/raw': float(scores.mean()), 'reward/proxy': float(proxy.mean()),
                  'reward/transformed': float(reward.mean()), 'reward/member_spread': float(scores.std(0).mean()),
                  'response_length': float(rmask.sum(1).mean()),
                  'eos_fraction': float(np.mean([tok.eos_id in r['tokens'] for r in saved]))})
    golds = np.concatenate(out['gold'])[:k] if out['gold'] else None
    if golds is not None:
      row['reward/gold'] = float(golds.mean())
      row['reward/proxy_gold_spearman'] = float(it.rank_correlation(jnp.asarray(proxy), jnp.asarray(golds)))
    rows.append(row)
    dest = workdir / 'rescored' / f'{n}_{file.name}'
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, 'w') as f:
      for i, r in enumerate(saved):
        f.write(json.dumps(dict(prompt_id=r.get('prompt_id'), scores=scores[:, i].tolist(), reward=float(reward[i]),
                                gold=None if golds is None else float(golds[i]))) + '\n')
  return rows


def table(rows: list[dict]) -> str:
  """A markdown table of the rows (columns: source, kind, step, then the metrics present)."""
  keys = [k for k in TABLE_KEYS if any(k in r for r in rows)]
  fmt = lambda v: '' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v))
  lines = ['| source | kind | step | ' + ' | '.join(keys) + ' |', '|' + '---|' * (3 + len(keys))]
  for r in rows:
    lines.append('| ' + ' | '.join([r['source'], r['kind'], fmt(r['step'])] + [fmt(r.get(k)) for k in keys]) + ' |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> list[dict]:
  """Re-scores `config.score.policies` and `config.score.rollouts`; writes the table (see the module docstring)."""
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = []
  if config.score.policies:
    setup_config = ml_collections.ConfigDict(config.to_dict())
    setup_config.policy.path = _paths(config.score.policies)[0]
    setup = trainer.build(setup_config)
    frozen = trainer.frozen_models(setup, None)
    rows += score_policies(config, setup, frozen)
  if config.score.rollouts:
    rows += score_rollouts(config, workdir)
  (workdir / 'scores.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (workdir / 'scores.md').write_text(table(rows))
  print(table(rows))
  return rows


def get_config(arg: str = 'tiny'):
  """`configs/score.py`: the RL trainer's data, reward, gold and sampling sections plus `score`."""
  c = trainer.base_config('grpo', arg)
  c.job = 'rmjax.rl.score:run'
  c.objective = ml_collections.ConfigDict(dict(reward='mean'))
  c.score = ml_collections.ConfigDict(dict(policies='', rollouts='', reference='', batch_size=64))
  for name in ('optim', 'train', 'population'):  # nothing is trained
    del c[name]
  return c
