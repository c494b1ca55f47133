"""The reward-overoptimization study on the embedded synthetic world (`configs/study/overoptimization.py`).

After Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization": a synthetic gold
reward model labels preference pairs; proxies trained on them are optimized and scored by the
gold), Coste et al. 2023 (ensembles — `mean`, `wco`, `uwo` — with 25% label noise) and
Eisenstein et al. 2023 (finetune-seed ensembles on a shared pretrained backbone).

Stages (`experiments.pipeline`; each cached under `WORKDIR/<stage>/<key>/`):

  policy   the base policy pretrained on the synthetic language (`experiments/rm_world.py`)
  gold     the gold reward: a larger network with random weights from the seed plus fluency
           under the grammar, standardized on base-policy samples (`rm_world.Gold`)
  pairs    preference pairs from the base policy, labeled by the gold ordering, a share flipped
  proxies  a K-member finetune-seed ensemble initialised from the policy's backbone, heads from
           K seeds; member 0 is the single proxy (the optimizer runs per member, so it is trained
           exactly as it would be alone); each member normalized on base-policy samples
  bon      N samples per held-out prompt drawn once from the base policy and scored by every
           member and the gold; best-of-n curves for every objective by the unbiased estimator
  warm, bon_warm  WARM (Ramé et al. 2024): the members' weights averaged into one reward model,
           and its scores of the best-of-n samples (run when `warm` is among the objectives)
  backbones, proxies_pretrain, bon_pretrain  a pretrain-seed ensemble (Eisenstein et al. 2023):
           `pretrain.members` language models pretrained from different seeds, one proxy on each,
           and their scores of the best-of-n samples (run when `pretrain.members` > 0)
  ref_rewards  base-policy samples per prompt scored by the single proxy: `log_sigmoid`'s r_ref(x)
  rl_<objective>  RLOO against the objective, `rl.seeds` seeds × `rl.kl_coefs` KL-penalty
           coefficients as one vmapped population; curves over its saved steps
           (`experiments/study_rl.py`)
  dpo      DPO on the training pairs at each β of `dpo.betas`, `dpo.seeds` seeds each, scored at
           its checkpoints like RL (`experiments/study_dpo.py`; none when `dpo.betas` is empty)
  lm_<w>x<l>, proxy_<w>x<l>_n<n>, bon_<w>x<l>_n<n>  the proxy-size and data-size sweep (Gao et
           al. 2022, Figs. 2-3): a language model of width w and l layers pretrained like the policy,
           a single proxy on it trained on the first n training pairs, its best-of-n curve on the
           study's samples (`_size_sweep`)
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
from rmjax.train import loop, rm_trainer

from experiments import rm_world, sft, study_dpo, study_report, study_rl
from experiments.pipeline import Pipeline

STAGES = ('policy', 'gold', 'pairs', 'proxies', 'bon', 'warm', 'bon_warm', 'backbones', 'proxies_pretrain',
          'bon_pretrain', 'curves', 'ref_rewards', 'dpo', 'report')
SINGLE, WARM, LOG_SIGMOID, ONE_MODEL = study_rl.SINGLE, study_rl.WARM, study_rl.LOG_SIGMOID, study_rl.ONE_MODEL
MEMBERS, PRETRAIN = 'members', 'pretrain'  # the finetune-seed and the pretrain-seed ensembles' scores


def validate(config: ml_collections.ConfigDict) -> None:
  """Check the study config before anything compiles."""
  C = config_lib
  rm_world.validate(_rm_config(config))
  shape = lambda section: config_lib.model_config(section, vocab_size=1)
  if shape(config.proxy.model) != shape(config.world.policy.model):
    raise C.ConfigError('config.proxy.model differs from world.policy.model: the proxies start from the '
                        "policy's pretrained backbone, so give them its shape (other proxy sizes: config.sizes).")
  _validate_sizes(config)
  C.require_positive(config, 'proxy.members', 'bon.num_prompts', 'bon.samples', 'bon.n_max', 'bon.batch')
  if config.bon.n_max > config.bon.samples:
    raise C.ConfigError(f'config.bon.n_max={config.bon.n_max} exceeds bon.samples={config.bon.samples}: the '
                        'unbiased best-of-n estimator needs n <= N samples per prompt.')
  study_rl.validate(config)
  study_dpo.validate(config)
  if LOG_SIGMOID in config.objectives:
    raise C.ConfigError('config.objectives: log_sigmoid is increasing in the single proxy\'s reward for each '
                        'prompt, so best-of-n picks what `single` picks; list it in rl.objectives only.')
  for name in (*config.objectives, *config.rl.objectives):
    if name not in ONE_MODEL:
      aggregation(config, name)
  if LOG_SIGMOID in config.rl.objectives:
    C.require_positive(config, 'log_sigmoid.ref_samples')
    C.require_range(config, 'log_sigmoid.q', 0.0, 1.0)
  if config.pretrain.members:
    if config.pretrain.members < 2:
      raise C.ConfigError(f'config.pretrain.members={config.pretrain.members}: an ensemble needs 2 or more '
                          'members (0 = no pretrain-seed ensemble).')
    for name in (*config.pretrain.objectives, *config.pretrain.rl_objectives):
      if name in ONE_MODEL:
        raise C.ConfigError(f'config.pretrain: {name!r} is not an ensemble objective; list aggregations only.')
      aggregation(config, name)


def aggregation(config, name: str):
  """The registered aggregation `name` with its options from `config.<name>` (if that section exists)."""
  kwargs = config[name].to_dict() if name in config else {}
  try:
    return objectives.get(name, **kwargs)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.objectives: {e}') from e


def _validate_sizes(config) -> None:
  s, C = config.sizes, config_lib
  if bool(s.models) != bool(s.num_train):
    raise C.ConfigError(f'config.sizes: models={tuple(s.models)} and num_train={tuple(s.num_train)}: give both '
                        '(the sweep is their product) or neither.')
  for m in s.models:
    if (not isinstance(m, (tuple, list)) or len(m) != 2 or not all(isinstance(v, int) and v > 0 for v in m)
        or m[0] % 16):
      raise C.ConfigError(f'config.sizes.models: {m!r} is not (width, layers) with the width a positive multiple '
                          'of 16 (attention heads of 16 dimensions).')
  for n in s.num_train:
    if not isinstance(n, int) or not 0 < n <= config.data.num_train:
      raise C.ConfigError(f'config.sizes.num_train: {n!r} is not a pair count in 1..data.num_train='
                          f'{config.data.num_train} (each point trains on the first n training pairs).')


def _rm_config(config, **proxy) -> ml_collections.ConfigDict:
  """The study's proxy section, with fields replaced by `proxy` (members, model, train), in the
  layout of the reward-model job (`configs/rm.py`)."""
  p = ml_collections.ConfigDict(dict(config.proxy.to_dict(), **proxy))
  return ml_collections.ConfigDict(dict(
      seed=config.seed, world=config.world, data=config.data, model=p.model,
      ensemble=dict(kind='full', members=p.members, bootstrap=False),
      loss=p.loss, optim=p.optim, train=p.train,
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
  rl_runs = _rl_runs(config)
  pipe = Pipeline(workdir, redo=redo, known=(*STAGES, *(stage for stage, _, _ in rl_runs), *_size_stages(config)))
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
  models = {MEMBERS: (RewardModel.from_dict(proxy_meta['model']), proxy_params, _stats(proxy_meta))}
  reward_stages = {MEMBERS: proxies_stage}
  bon_stage, samples = pipe.build(
      'bon', lambda d: bon_samples(config, d, policy_params, policy_cfg, gold, models[MEMBERS], tok),
      reads={'seed': config.seed, 'bon': config.bon, 'sampling': _sampling_fields(config.data)},
      after=[proxies_stage])
  scored = [bon_stage]
  if WARM in (*config.objectives, *config.rl.objectives):
    reward_stages[WARM], (warm_params, warm_meta) = pipe.build(
        'warm', lambda d: warm_proxy(rmc, d, data, tok, proxy_params, proxy_meta, mesh),
        reads={}, after=[proxies_stage], summary=lambda out: out[1]['eval'])
    models[WARM] = (RewardModel.from_dict(warm_meta['model']), warm_params, _stats(warm_meta))
    bon_warm_stage, samples[WARM] = pipe.build(
        'bon_warm', lambda d: score_samples(config, d, samples, models[WARM], tok, WARM), reads={},
        after=[bon_stage, reward_stages[WARM]])
    scored.append(bon_warm_stage)
  if config.pretrain.members:
    k = int(config.pretrain.members)
    backbones_stage, backbones = pipe.build(
        'backbones', lambda d: pretrain_backbones(config, d, policy_params, tok, mesh),
        reads={'seed': config.seed, 'num_documents': w.num_documents, 'policy': w.policy, 'members': k},
        after=[policy_stage])
    reward_stages[PRETRAIN], (pre_params, pre_meta) = pipe.build(
        'proxies_pretrain', lambda d: rm_world.train_reward_models(_rm_config(config, members=k), d, data, tok, mesh,
                                                                   init_backbone=backbones),
        reads={'seed': config.seed, 'proxy': config.proxy}, after=[pairs_stage, backbones_stage],
        summary=lambda out: out[1]['eval'])
    models[PRETRAIN] = (RewardModel.from_dict(pre_meta['model']), pre_params, _stats(pre_meta))
    bon_pretrain_stage, samples[PRETRAIN] = pipe.build(
        'bon_pretrain', lambda d: score_samples(config, d, samples, models[PRETRAIN], tok, PRETRAIN), reads={},
        after=[bon_stage, reward_stages[PRETRAIN]])
    scored.append(bon_pretrain_stage)
  curves_stage, curves = pipe.build(
      'curves', lambda d: bon_curves(config, samples, models),
      reads={'seed': config.seed, 'objectives': config.objectives, 'pretrain': config.pretrain,
             **{name: config[name] for name in config.objectives if name in config}},
      after=scored, summary=lambda out: out)
  sweep = []
  if config.sizes.models:
    single = next(c for c in curves['curves'] if c['method'] == SINGLE)
    k = int(config.proxy.members)
    single = {**single, 'num_train': int(config.data.num_train), 'proxy_params': _param_count(proxy_params, k),
              'agreement': proxy_meta['eval']['eval/gold_accuracy' + ('_0' if k > 1 else '')]}
    sweep = _size_sweep(pipe, config, {'policy': policy_stage, 'pairs': pairs_stage, 'bon': bon_stage},
                        policy_params, data, samples, tok, mesh, single)
  # rl.extra_evals left empty leaves the keys of runs made before it existed unchanged
  rl_reads = {'seed': config.seed, 'rl': {k: v for k, v in config.rl.items()
                                          if k != 'objectives' and (k != 'extra_evals' or v)},
              'sampling': _sampling_fields(config.data), 'num_eval': config.bon.num_prompts}
  reward_fns = {source: (lambda name, scores, source=source: objective_reward(config, name, scores,
                                                                              models[source][2]))
                for source in models}
  rl_stages = []
  for stage_name, name, source in rl_runs:
    after = [policy_stage, gold_stage, reward_stages[source]]
    dirs = {'policy': policy_stage.dir, 'gold': gold_stage.dir, 'reward': reward_stages[source].dir}
    if name == LOG_SIGMOID:
      ref_stage, dirs['ref_samples'] = pipe.build(
          'ref_rewards', lambda d: reference_rewards(config, d, policy_params, policy_cfg, models[MEMBERS], tok),
          reads={'seed': config.seed, 'samples': config.log_sigmoid.ref_samples, 'num_eval': config.bon.num_prompts,
                 'num_prompts': w.num_prompts, 'sampling': _sampling_fields(config.data)}, after=[proxies_stage])
      after.append(ref_stage)
    rl_stages.append(pipe.build(
        stage_name, lambda d, name=name, source=source, dirs=dirs: study_rl.run(
            config, d, name, dirs, reward_fns[source], gold, ensemble=_ensemble(name, source)),
        reads={**rl_reads, 'objective': name, 'options': config[name] if name in config else None},
        after=after, summary=lambda out: out)[0])
  trained = rl_stages
  if config.dpo.betas:
    dirs = {'policy': policy_stage.dir, 'gold': gold_stage.dir, 'reward': proxies_stage.dir, 'pairs': pairs_stage.dir}
    r = config.rl
    trained = [*rl_stages, pipe.build(
        'dpo', lambda d: study_dpo.run(config, d, dirs, reward_fns[MEMBERS], gold),
        reads={'seed': config.seed, 'dpo': config.dpo, 'sampling': _sampling_fields(config.data),
               'eval': {'group_size': r.group_size, 'prompt_len': r.prompt_len, 'num_eval': config.bon.num_prompts}},
        after=[policy_stage, gold_stage, pairs_stage, proxies_stage], summary=lambda out: out)[0]]
  report_stage, _ = pipe.build(
      'report', lambda d: study_report.write(config, workdir, pipe.stages, sweep),
      reads={'seed': config.seed}, after=[curves_stage, *trained, *(pipe.stages[n] for n in _size_stages(config)
                                                                   if n in pipe.stages)],
      summary=lambda out: out)
  print(f'report: {report_stage.result["report"]}')
  return report_stage.result


def _source(name: str) -> str:
  """Which model's scores objective `name` reads: WARM's, or the finetune-seed members'."""
  return WARM if name == WARM else MEMBERS


def _ensemble(name: str, source: str) -> str | None:
  """A curve's `ensemble` field: None for the single proxy, else how the members differ."""
  return None if name == SINGLE else ('pretrain' if source == PRETRAIN else 'finetune')


def _with_sources(names, pretrain_names) -> list[tuple[str, str]]:
  """(objective, source of its scores) for `names` and, on the pretrain-seed ensemble, `pretrain_names`."""
  return [(n, _source(n)) for n in names] + [(n, PRETRAIN) for n in pretrain_names]


def _rl_runs(config) -> list[tuple[str, str, str]]:
  """(stage name, objective, source) of every RL stage."""
  pretrain = config.pretrain.rl_objectives if config.pretrain.members else ()
  return [(f'rl_{n}' + ('_pretrain' if src == PRETRAIN else ''), n, src)
          for n, src in _with_sources(config.rl.objectives, pretrain)]


def size_model(config, width: int, layers: int) -> ml_collections.ConfigDict:
  """`proxy.model` at `width` x `layers` in `tiny`'s proportions: MLP width 4·⌈2·width/3⌉ (≈ 8/3 of
  the width), attention heads of 16 dimensions, two query heads per KV head. (64, 2) is `tiny`."""
  heads = width // 16
  return ml_collections.ConfigDict(dict(config.proxy.model.to_dict(), width=width, mlp_width=4 * -(-2 * width // 3),
                                        num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 2)))


def _size_stages(config) -> list[str]:
  """The names of the sweep's stages (those it may run; the point the study already has runs none)."""
  names = [f'{w}x{n_layers}' for w, n_layers in config.sizes.models]
  return [f'lm_{m}' for m in names] + [f'{stage}_{m}_n{n}' for m in names for n in config.sizes.num_train
                                       for stage in ('proxy', 'bon')]


def _param_count(params, members: int) -> int:
  """Parameters of one member of a stacked reward-model ensemble."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(params)) // members


def _size_sweep(pipe: Pipeline, config, after: dict, policy_params, data, samples: dict, tok, mesh,
                single: dict) -> list[dict]:
  """The proxy-size and data-size sweep (Gao et al. 2022, Figs. 2-3). For each (width, layers) of
  `sizes.models`, stage `lm_<w>x<l>` pretrains a language model of that size like the policy (same
  world, documents, settings and seed; the policy itself at its own size). For each n of
  `sizes.num_train`, stage `proxy_<w>x<l>_n<n>` trains a single proxy on that backbone on the first
  n training pairs for `proxy.train.steps` · n / `data.num_train` steps (as many passes over its
  pairs as the study's proxies make), and stage `bon_<w>x<l>_n<n>` scores the best-of-n samples with
  it for its curve. The point at the proxy's own size with all pairs is the study's single proxy
  (`single`: its curve), so it runs no stage.

  Returns the curves, each with `proxy_size` ('<w>x<l>'), `proxy_params`, `num_train`, `agreement`.
  """
  vocab = {'vocab_size': tok.vocab_size}
  own = config_lib.model_config(config.proxy.model, **vocab)
  w = config.world
  out = []
  for width, layers in config.sizes.models:
    name, model = f'{width}x{layers}', size_model(config, width, layers)
    shape = config_lib.model_config(model, **vocab)
    if shape == config_lib.model_config(w.policy.model, **vocab):
      lm_stage, backbone = after['policy'], policy_params['backbone']
    else:
      lm = ml_collections.ConfigDict(dict(w.policy.to_dict(), model=model.to_dict()))
      corpus = lambda d: sft.grammar_corpus(d, int(config.seed), int(w.num_documents)).as_data_source('train')
      lm_stage, (lm_params, _) = pipe.build(
          f'lm_{name}', lambda d, lm=lm: sft.pretrain(lm, d, corpus(d), tok, mesh, config),
          reads={'seed': config.seed, 'num_documents': w.num_documents, 'policy': lm})
      backbone = lm_params['backbone']
    for n in config.sizes.num_train:
      if shape == own and n == config.data.num_train:
        out.append({**single, 'proxy_size': name})
        continue
      steps = max(1, round(int(config.proxy.train.steps) * n / int(config.data.num_train)))
      proxy = dict(members=1, model=model.to_dict(), train=dict(config.proxy.train.to_dict(), steps=steps))
      proxy_stage, (params, meta) = pipe.build(
          f'proxy_{name}_n{n}', lambda d, proxy=proxy, n=n, backbone=backbone: rm_world.train_reward_models(
              _rm_config(config, **proxy), d, data, tok, mesh, init_backbone=backbone, num_train=n),
          reads={'seed': config.seed, 'proxy': {**config.proxy.to_dict(), **proxy}, 'num_train': n},
          after=[after['pairs'], lm_stage], summary=lambda out: out[1]['eval'])
      bon_stage = pipe.run(f'bon_{name}_n{n}', lambda d, params=params, meta=meta: _size_curve(
          config, d, samples, params, meta, tok), reads={}, after=[after['bon'], proxy_stage])
      out.append({**bon_stage.result, 'proxy_size': name, 'num_train': n})
  return out


def _size_curve(config, folder: pathlib.Path, samples: dict, params, meta: dict, tok) -> dict:
  """A sweep point's best-of-n curve: the single proxy (params, checkpoint metadata) scores the
  best-of-n samples (saved in `folder`); with `proxy_params` and held-out `agreement`."""
  model = (RewardModel.from_dict(meta['model']), params, _stats(meta))
  proxy = objective_reward(config, SINGLE, score_samples(config, folder, samples, model, tok, folder.parent.name),
                           model[2])
  curve = bon_curve(SINGLE, proxy, samples['gold'], _traits(samples), _sample_ids(samples), _bon_ns(config),
                    int(config.seed), ensemble=None)
  return {**curve, 'proxy_params': _param_count(params, 1), 'agreement': meta['eval']['eval/gold_accuracy']}


def reference_rewards(config, folder: pathlib.Path, policy_params, policy_cfg, members: tuple, tok) -> pathlib.Path:
  """Stage `ref_rewards`: for `log_sigmoid`'s r_ref(x), `log_sigmoid.ref_samples` base-policy samples
  per prompt id (the world's prompts, then the held-out ones, as the RL trainer numbers them),
  scored by the single proxy (member 0, normalized). Saves and returns `ref_samples.npy` `[P_all, N]`.
  """
  path = folder / 'ref_samples.npy'
  if not path.exists():
    n = int(config.log_sigmoid.ref_samples)
    prompts = Grammar.random(config.seed).prompts(int(config.world.num_prompts) + int(config.bon.num_prompts),
                                                  seed=config.seed)
    flat = [p for p in prompts for _ in range(n)]
    sample_config = _sample_config(config)
    responses = rm_world.sample_responses(sample_config, policy_params, policy_cfg, flat, tok, split_seed=9,
                                          desc='reference samples')
    model, params, stats = members
    raw = rm_world.score_texts(sample_config, model, params, tok, list(zip(flat, responses)), desc='reference scores')
    np.save(folder / 'ref_samples.tmp.npy', ((raw[0] - stats.mean[0]) / stats.std[0]).reshape(len(prompts), n))
    (folder / 'ref_samples.tmp.npy').replace(path)
  return path


def pretrain_backbones(config, folder: pathlib.Path, policy_params, tok, mesh) -> list:
  """Stage `backbones`: the backbones of a pretrain-seed ensemble (Eisenstein et al. 2023).

  Member 0 is the policy's backbone; member k > 0 is the backbone of a language model pretrained
  like the policy — same world, documents and settings — from seed `1000·seed + k` (its
  initialization and batch order), in `folder/seed_k`. Returns the `pretrain.members` backbones.
  """
  corpus = sft.grammar_corpus(folder, int(config.seed), int(config.world.num_documents)).as_data_source('train')
  backbones = [policy_params['backbone']]
  for k in range(1, int(config.pretrain.members)):
    run_config = ml_collections.ConfigDict(dict(config.to_dict(), seed=1000 * int(config.seed) + k))
    params, _ = sft.pretrain(config.world.policy, folder / f'seed_{k}', corpus, tok, mesh, run_config)
    backbones.append(params['backbone'])
  return backbones


def warm_proxy(rmc, folder: pathlib.Path, data, tok, proxy_params, proxy_meta, mesh) -> tuple[dict, dict]:
  """Stage `warm`: WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models").

  θ_WARM = (1/K) Σ_k θ_k, the uniform average of the finetune-seed members' weights (they start
  from one pretrained backbone, the setting in which weight averaging works), as one reward
  model; normalized on the same base-policy responses as the members and evaluated on the same
  held-out pairs. Saved as a reward-model checkpoint in `folder/checkpoints` (what RL reads).
  Returns (params, metadata).
  """
  model = RewardModel(RewardModel.from_dict(proxy_meta['model']).config, num_members=1, kind='full')

  def build():
    params = jax.tree.map(lambda x: np.asarray(x).mean(axis=0, keepdims=True), proxy_params)
    scores = rm_trainer.collect_scores(rm_trainer.make_score_fn(model), params, rm_world.eval_pairs(rmc, data, tok),
                                       mesh)
    stats = rm_trainer.normalization_stats(np.concatenate([scores['r_chosen'], scores['r_rejected']], axis=1))
    metrics = rm_trainer.pair_metrics(scores, rm_trainer.make_loss(rmc.loss), stats=stats)
    return {'params': params}, loop.describe(
        rmc, kind='reward_model', model=model.to_dict(), tokenizer=tok.to_dict(), role='warm',
        normalization={'mean': stats.mean.tolist(), 'std': stats.std.tolist()}, eval=metrics)

  state, meta = rm_world.saved_once(folder / 'checkpoints', build)
  return jax.tree.map(jax.numpy.asarray, state['params']), meta


def _stats(meta) -> objectives.RewardStats:
  """The per-member normalization saved with a reward model's final checkpoint."""
  return objectives.RewardStats(mean=np.asarray(meta['normalization']['mean']),
                                std=np.asarray(meta['normalization']['std']))


def _sample_config(config) -> ml_collections.ConfigDict:
  """The sampling and scoring settings of best-of-n (`rm_world.sample_responses`, `score_texts`)."""
  return ml_collections.ConfigDict(dict(seed=config.seed, data=dict(config.data.to_dict(),
                                                                    sample_batch=config.bon.batch)))


def bon_samples(config, folder: pathlib.Path, policy_params, policy_cfg, gold, members: tuple, tok) -> dict:
  """Stage `bon`: draw N samples per held-out prompt once and score them by every member and the gold.

  members: (RewardModel, params, stats) of the ensemble. Saves (and, when present, loads)
  `samples.npz` — gold `[P, N]` (normalized), members `[K, P, N]` (raw), lengths `[P, N]`,
  grammatical share of the sentences `[P, N]` — and `samples.json` (prompts and response texts).
  """
  b = config.bon
  samples_file = folder / 'samples.npz'
  if not samples_file.exists():
    prompts = held_out_prompts(config)
    n_prompts, n_samples = len(prompts), int(b.samples)
    flat_prompts = [p for p in prompts for _ in range(n_samples)]
    sample_config = _sample_config(config)
    responses = rm_world.sample_responses(sample_config, policy_params, policy_cfg, flat_prompts, tok,
                                          split_seed=7, desc='best-of-n samples')
    pairs = list(zip(flat_prompts, responses))
    model, params, _ = members
    arrays = {'members': rm_world.score_texts(sample_config, model, params, tok, pairs, desc='proxy scores'
                                              ).reshape(-1, n_prompts, n_samples),
              'gold': gold.score(sample_config, tok, pairs).reshape(n_prompts, n_samples),
              'lengths': np.array([len(tok.encode(t)) for t in responses]).reshape(n_prompts, n_samples),
              'grammatical': np.array([gold.grammar.grammatical_share(t) for t in responses]).reshape(n_prompts,
                                                                                                      n_samples)}
    (folder / 'samples.json').write_text(json.dumps({'prompts': prompts, 'texts': responses}))
    np.savez(folder / 'samples.tmp.npz', **arrays)
    (folder / 'samples.tmp.npz').replace(samples_file)
  return {**dict(np.load(samples_file)), **json.loads((folder / 'samples.json').read_text())}


def score_samples(config, folder: pathlib.Path, samples: dict, model: tuple, tok, name: str) -> np.ndarray:
  """Stages `bon_warm`, `bon_pretrain`: raw scores `[K, P, N]` of the best-of-n samples by another
  reward model (model, params, stats), saved as (and, when present, loaded from) `scores.npy`."""
  path = folder / 'scores.npy'
  if not path.exists():
    n_prompts, n_samples = samples['gold'].shape
    pairs = [(p, r) for p, r in zip((p for p in samples['prompts'] for _ in range(n_samples)), samples['texts'])]
    rm, params, _ = model
    scores = rm_world.score_texts(_sample_config(config), rm, params, tok, pairs, desc=f'{name} scores')
    np.save(folder / 'scores.tmp.npy', scores.reshape(-1, n_prompts, n_samples))
    (folder / 'scores.tmp.npy').replace(path)
  return np.load(path)


def bon_curves(config, samples: dict, models: dict) -> dict:
  """Stage `curves`: one best-of-n curve per objective of `config.objectives` (cheap: no sampling)."""
  ns, ids = _bon_ns(config), _sample_ids(samples)
  curves = []
  pretrain = config.pretrain.objectives if config.pretrain.members else ()
  for name, source in _with_sources(config.objectives, pretrain):
    proxy = objective_reward(config, name, samples[source], models[source][2])  # [P, N]
    curve = bon_curve(name, proxy, samples['gold'], _traits(samples), ids, ns, int(config.seed),
                      ensemble=_ensemble(name, source))
    curve['examples'] = _examples(samples, proxy, samples['gold'], ns[-1])
    curves.append(curve)
  return {'ns': ns, 'curves': curves}


def _bon_ns(config) -> list[int]:
  """n = 1, 2, 4, ..., bon.n_max."""
  return [1 << i for i in range(int(np.log2(int(config.bon.n_max))) + 1)]


def _sample_ids(samples: dict) -> np.ndarray:
  """`[P, N]` ids of the best-of-n responses, shared by identical ones (for the plug-in KL)."""
  return np.unique(np.asarray(samples['texts'], dtype=str), return_inverse=True)[1].reshape(samples['gold'].shape)


def _traits(samples: dict) -> dict[str, np.ndarray]:
  """The per-sample traits a best-of-n curve reports at the chosen samples."""
  return {'length': samples['lengths'], 'grammatical': samples['grammatical']}


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
  """The optimized reward `[P, N]` of objective `name` from raw scores `[K, P, N]` of its model
  (`_source`), normalized by that model's `stats`."""
  k, p, n = members.shape
  flat = members.reshape(k, p * n)
  if name in ONE_MODEL:  # log_sigmoid's proxy reward is the single proxy's
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
