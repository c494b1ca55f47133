"""The reward-overoptimization study on the embedded synthetic world (`configs/study/overoptimization.py`).

After Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization": a synthetic gold
reward model labels preference pairs; proxies trained on them are optimized and scored by the
gold), Coste et al. 2023 (ensembles — `mean`, `wco`, `uwo` — with 25% label noise) and
Eisenstein et al. 2023 (finetune-seed ensembles on a shared pretrained backbone).

Stages (`experiments.pipeline`; each cached under `WORKDIR/<stage>/<key>/`):

  policy   the base policy pretrained on the synthetic language (`experiments/rm_world.py`)
  gold     the gold reward model (larger, random weights from the seed, normalized on base samples)
  pairs    preference pairs from the base policy, labeled by the gold ordering, a share flipped
  proxies  a K-member finetune-seed ensemble initialised from the policy's backbone, heads from
           K seeds; member 0 is the single proxy (the optimizer runs per member, so it is trained
           exactly as it would be alone); each member normalized on base-policy samples
  bon      N samples per held-out prompt drawn once from the base policy and scored by every
           member and the gold; best-of-n curves for every objective by the unbiased estimator
  rl_<objective>  RLOO against the objective, `rl.seeds` seeds × `rl.kl_coefs` KL-penalty
           coefficients as one vmapped population; curves over its saved steps
           (`experiments/study_rl.py`)
  report   `results.json`, PNG plots and `report.md`

Rewards are reported relative to the base policy (R(0) = 0, `../shared/PITFALLS.md` #11), in
units of the gold's (and each proxy member's) std on base-policy samples. The KL of best-of-n
is the bound log n − (n−1)/n (Gao et al.'s x-axis), with the plug-in value over the distinct
samples beside it; the KL of RL is the held-out mean of Σ_t (log π − log π_ref) on the policy's
own samples.
"""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.data.synthetic_language import Grammar
from rmjax.eval import fits
from rmjax.models.reward_model import RewardModel
from rmjax.rl import best_of_n as bon_lib

from experiments import rm_world, study_report, study_rl
from experiments.pipeline import Pipeline

STAGES = ('policy', 'gold', 'pairs', 'proxies', 'bon', 'curves', 'report')
SINGLE = study_rl.SINGLE


def validate(config: ml_collections.ConfigDict) -> None:
  """Check the study config before anything compiles."""
  C = config_lib
  rm_world.validate(_rm_config(config))
  C.require_positive(config, 'proxy.members', 'bon.num_prompts', 'bon.samples', 'bon.n_max', 'bon.batch')
  if config.bon.n_max > config.bon.samples:
    raise C.ConfigError(f'config.bon.n_max={config.bon.n_max} exceeds bon.samples={config.bon.samples}: the '
                        'unbiased best-of-n estimator needs n <= N samples per prompt.')
  study_rl.validate(config)
  for name in (*config.objectives, *config.rl.objectives):
    if name != SINGLE:
      aggregation(config, name)


def aggregation(config, name: str):
  """The registered aggregation `name` with its options from `config.<name>` (if that section exists)."""
  kwargs = config[name].to_dict() if name in config else {}
  try:
    return objectives.get(name, **kwargs)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.objectives: {e}') from e


def _rm_config(config) -> ml_collections.ConfigDict:
  """The study's proxy section in the layout of the reward-model job (`configs/rm.py`)."""
  p = config.proxy
  return ml_collections.ConfigDict(dict(
      seed=config.seed, world=config.world, data=config.data, model=p.model,
      ensemble=dict(kind='full', members=p.members, bootstrap=False), loss=p.loss, optim=p.optim, train=p.train,
      eval=dict(batch_size=p.eval_batch_size, aggregate='mean'), mesh=config.mesh))


def _sampling_fields(data) -> dict:
  """The fields of `config.data` that sampling from the policy and scoring read."""
  return {k: data[k] for k in ('max_new_tokens', 'temperature', 'seq_len', 'sample_batch')}


def held_out_prompts(config) -> list[str]:
  """`bon.num_prompts` prompts of the grammar that are not among the training prompts."""
  n_train, n = int(config.world.num_prompts), int(config.bon.num_prompts)
  return Grammar.random(config.seed).prompts(n_train + n, seed=config.seed)[n_train:]


def run(config: ml_collections.ConfigDict, workdir: str, redo: tuple[str, ...] = ()) -> dict:
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  pipe = Pipeline(workdir, redo=redo, known=(*STAGES, *(f'rl_{name}' for name in config.rl.objectives)))
  mesh = parallel.mesh_from_config(config.mesh)
  prompts, tok = rm_world.world(config)
  rmc = _rm_config(config)
  w = config.world

  policy_stage, (policy_params, policy_cfg) = pipe.build(
      'policy', lambda d: rm_world.train_policy(config, d, tok, mesh),
      reads={'seed': config.seed, 'num_documents': w.num_documents, 'policy': w.policy})
  gold_stage, gold = pipe.build(
      'gold', lambda d: rm_world.make_gold(config, d, policy_params, policy_cfg, prompts, tok),
      reads={'seed': config.seed, 'gold': w.gold, 'num_prompts': w.num_prompts,
             'sampling': _sampling_fields(config.data)}, after=[policy_stage])
  pairs_stage, data = pipe.build(
      'pairs', lambda d: rm_world.make_pairs(config, d, policy_params, policy_cfg, gold, prompts, tok),
      reads={'seed': config.seed, 'data': config.data, 'num_prompts': w.num_prompts}, after=[gold_stage])
  proxies_stage, (proxy_params, proxy_meta) = pipe.build(
      'proxies', lambda d: rm_world.train_reward_models(rmc, d, data, tok, mesh,
                                                          init_backbone=policy_params['backbone']),
      reads={'seed': config.seed, 'proxy': config.proxy}, after=[pairs_stage],
      summary=lambda out: out[1]['eval'])
  bon_stage, samples = pipe.build(
      'bon', lambda d: bon_samples(config, d, policy_params, policy_cfg, gold, proxy_params, proxy_meta, tok),
      reads={'seed': config.seed, 'bon': config.bon, 'sampling': _sampling_fields(config.data)},
      after=[proxies_stage])
  curves_stage, curves = pipe.build(
      'curves', lambda d: bon_curves(config, samples, _stats(proxy_meta)),
      reads={'seed': config.seed, 'objectives': config.objectives,
             **{name: config[name] for name in config.objectives if name in config}},
      after=[bon_stage], summary=lambda out: out)
  rl_reads = {'seed': config.seed, 'rl': {k: v for k, v in config.rl.items() if k != 'objectives'},
              'sampling': _sampling_fields(config.data), 'num_eval': config.bon.num_prompts}
  dirs = {'policy': policy_stage.dir, 'gold': gold_stage.dir, 'proxies': proxies_stage.dir}
  reward_fn = lambda name, members: objective_reward(config, name, members, _stats(proxy_meta))
  rl_stages = [pipe.build(f'rl_{name}', lambda d, name=name: study_rl.run(config, d, name, dirs, reward_fn, gold),
                          reads={**rl_reads, 'objective': name, 'options': config[name] if name in config else None},
                          after=[policy_stage, gold_stage, proxies_stage], summary=lambda out: out)[0]
               for name in config.rl.objectives]
  report_stage, _ = pipe.build(
      'report', lambda d: study_report.write(config, workdir, pipe.stages),
      reads={'seed': config.seed}, after=[curves_stage, *rl_stages], summary=lambda out: out)
  print(f'report: {report_stage.result["report"]}')
  return report_stage.result


def _stats(meta) -> objectives.RewardStats:
  """The per-member normalization saved with a reward model's final checkpoint."""
  return objectives.RewardStats(mean=np.asarray(meta['normalization']['mean']),
                                std=np.asarray(meta['normalization']['std']))


def bon_samples(config, folder: pathlib.Path, policy_params, policy_cfg, gold, proxy_params, proxy_meta,
                tok) -> dict:
  """Stage `bon`: draw N samples per held-out prompt once and score them by every member and the gold.

  Saves (and, when present, loads) `samples.npz` — gold `[P, N]` (normalized), members `[K, P, N]`
  (raw), lengths `[P, N]`, grammatical share of the sentences `[P, N]` — and `samples.json`
  (prompts and response texts).
  """
  b = config.bon
  samples_file = folder / 'samples.npz'
  if not samples_file.exists():
    prompts = held_out_prompts(config)
    n_prompts, n_samples = len(prompts), int(b.samples)
    flat_prompts = [p for p in prompts for _ in range(n_samples)]
    sample_config = ml_collections.ConfigDict(dict(seed=config.seed,
                                                   data=dict(config.data.to_dict(), sample_batch=b.batch)))
    responses = rm_world.sample_responses(sample_config, policy_params, policy_cfg, flat_prompts, tok,
                                          split_seed=7, desc='best-of-n samples')
    pairs = list(zip(flat_prompts, responses))
    members = rm_world.score_texts(sample_config, RewardModel.from_dict(proxy_meta['model']), proxy_params, tok,
                                   pairs, desc='proxy scores')
    arrays = {'gold': gold.score(sample_config, tok, pairs).reshape(n_prompts, n_samples),
              'members': members.reshape(-1, n_prompts, n_samples),
              'lengths': np.array([len(tok.encode(t)) for t in responses]).reshape(n_prompts, n_samples),
              'grammatical': np.array([gold.grammar.grammatical_share(t) for t in responses]).reshape(n_prompts,
                                                                                                      n_samples)}
    (folder / 'samples.json').write_text(json.dumps({'prompts': prompts, 'texts': responses}))
    np.savez(folder / 'samples.tmp.npz', **arrays)
    (folder / 'samples.tmp.npz').replace(samples_file)
  return {**dict(np.load(samples_file)), **json.loads((folder / 'samples.json').read_text())}


def bon_curves(config, samples: dict, stats: objectives.RewardStats) -> dict:
  """Stage `curves`: one best-of-n curve per objective of `config.objectives` (cheap: no sampling)."""
  n_prompts, n_samples = samples['gold'].shape
  ns = [1 << i for i in range(int(np.log2(int(config.bon.n_max))) + 1)]
  # identical responses of a prompt share an id (for the plug-in KL)
  ids = np.unique(np.asarray(samples['texts'], dtype=str), return_inverse=True)[1].reshape(n_prompts, n_samples)
  curves = []
  for name in config.objectives:
    proxy = objective_reward(config, name, samples['members'], stats)  # [P, N]
    curve = bon_curve(name, proxy, samples['gold'], {'length': samples['lengths'],
                                                     'grammatical': samples['grammatical']},
                      ids, ns, int(config.seed), ensemble=None if name == SINGLE else 'finetune')
    curve['examples'] = _examples(samples, proxy, samples['gold'], ns[-1])
    curves.append(curve)
  return {'ns': ns, 'curves': curves}


def _examples(texts, proxy: np.ndarray, gold: np.ndarray, n_max: int, num_prompts: int = 2) -> list[dict]:
  """For the first prompts: a plain sample (n = 1) and the best of the first n_max by the objective."""
  n = proxy.shape[1]
  out = []
  for p in range(min(num_prompts, proxy.shape[0])):
    best = int(np.argmax(proxy[p, :n_max]))
    for label, i in (('n=1', 0), (f'n={n_max}', best)):
      out.append({'prompt': texts['prompts'][p], 'which': label, 'response': texts['texts'][p * n + i],
                  'proxy': float(proxy[p, i]), 'gold': float(gold[p, i])})
  return out


def objective_reward(config, name: str, members: np.ndarray, stats: objectives.RewardStats) -> np.ndarray:
  """The optimized reward `[P, N]` of objective `name` from raw member scores `[K, P, N]`."""
  k, p, n = members.shape
  flat = members.reshape(k, p * n)
  if name == SINGLE:
    out = (flat[0] - stats.mean[0]) / stats.std[0]
  else:
    out = np.asarray(aggregation(config, name)(jax.numpy.asarray(flat), stats=stats))
  return out.reshape(p, n)


def bon_curve(method: str, proxy: np.ndarray, gold: np.ndarray, traits: dict[str, np.ndarray], ids: np.ndarray,
              ns: list[int], seed: int, ensemble: str | None) -> dict:
  """One best-of-n curve: per n, KL (bound and plug-in), proxy and gold reward relative to n = 1
  (mean over prompts, with 95% bootstrap intervals over prompts), the mean of each of `traits`
  (`[P, N]` per sample: response length, grammatical share) at the chosen samples, and the fit."""
  per_prompt = {name: bon_lib.expected_best_of_n(proxy, s.astype(np.float64), ns) for name, s in
                (('proxy', proxy), ('gold', gold), *traits.items())}
  base_proxy, base_gold = proxy.mean(axis=1, keepdims=True), gold.mean(axis=1, keepdims=True)
  rel = {'proxy': per_prompt['proxy'] - base_proxy, 'gold': per_prompt['gold'] - base_gold}
  curve = {'method': method, 'optimizer': 'bon', 'ensemble': ensemble, 'kl_coef': None, 'seed': seed, 'n': ns,
           'kl': bon_lib.kl_bound(np.array(ns)).tolist(),
           'kl_plugin': [float(np.mean([bon_lib.plugin_kl(proxy[i], ids[i], n) for i in range(len(proxy))]))
                         for n in ns],
           **{name: per_prompt[name].mean(0).tolist() for name in traits}}
  for name in ('proxy', 'gold'):
    mean, lo, hi = fits.bootstrap_ci(rel[name], axis=0, seed=seed)
    curve[f'{name}_reward'], curve[f'{name}_reward_ci'] = mean.tolist(), [lo.tolist(), hi.tolist()]
  curve['fits'] = {name: fits.fit(curve['kl'], curve[f'{name}_reward'], 'bon') for name in ('gold', 'proxy')}
  return curve
