"""The reward-model job on a self-built synthetic world (`configs/rm.py`).

Stages, each stored under the workdir and skipped (or resumed) when already there:

1. `policy/`: a base policy (causal LM) pretrained by next-token prediction on documents
   (prompt + continuation) of the built-in synthetic language (`rmjax.data.Grammar`).
2. `gold/`: the gold reward standing in for human preferences (as in Gao et al., "Scaling
   Laws for Reward Model Overoptimization"), a fixed function of prompt x and response y with
   two parts (`Gold`):

     gold(x, y) = (z(x, y) + w · g(y) − μ) / σ

   z is the last-token read-out of a transformer reward model larger than the proxies, with
   random weights drawn from the run seed, standardized over base-policy samples: a smooth but
   non-linear function of the whole text, which the proxies learn only approximately from a
   few thousand labeled pairs. g is fluency under the world's grammar: the share of the
   response's sentences that parse (`Grammar.grammatical_share`; a cut-off sentence does not
   parse), weighted by w = `world.gold_fluency` (units of z's std: a response none of whose
   sentences parse loses w std against one whose sentences all parse). μ, σ standardize the
   sum over base-policy samples. Without g, a random network rates degenerate text (repeated
   non-words) as arbitrarily as anything else, so the gold could be exploited in the same
   direction as the proxies; with it, text the grammar rejects is worse, as it would be to a
   reader of the language.
3. `data/`: preference pairs — two responses per prompt sampled from the base policy, labeled
   by the gold's ordering (with an optional share of flipped labels) or by Bradley–Terry
   sampling from the gold — written as a TFDS dataset (array_record).
4. `rm/`: the reward-model ensemble (K members, full or multi-head) trained on the pairs,
   normalized (each member's mean/std over held-out policy responses saved with it) and
   evaluated against the gold's noiseless ordering. Writes `rm/eval.json`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from rmjax import config as config_lib
from rmjax import objectives, parallel
from rmjax.data import builders, pipeline
from rmjax.data.synthetic_language import Grammar
from rmjax.data.tokenizer import ByteTokenizer, Tokenizer
from rmjax.models import sampling
from rmjax.models.reward_model import RewardModel
from rmjax.train import checkpoint, loop, rm_trainer

from experiments import sft


def world_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """`config.world`: the synthetic language's prompts and documents, the base policy, the gold model.

  `variant` 'test' is a seconds-long world for the tests; anything else the laptop-size default.
  """
  w = ml_collections.ConfigDict()
  w.num_prompts = 512
  w.num_documents = 8192
  w.policy = ml_collections.ConfigDict(dict(
      model=config_lib.model('tiny'), optim=config_lib.optim(lr=3e-3, warmup_steps=20),
      train=config_lib.train(300, batch_size=32, checkpoint_every=100), seq_len=128))
  # The gold reward: a larger transformer than the proxies plus fluency under the grammar,
  # weighted in units of the network's std (module docstring).
  w.gold = config_lib.model('tiny', width=128, mlp_width=344, num_layers=4, num_heads=4, num_kv_heads=2)
  w.gold_fluency = 1.0
  if variant == 'test':
    w.num_prompts = 64
    w.num_documents = 512
    w.policy.train = config_lib.train(20, batch_size=16, log_every=10, checkpoint_every=10)
    w.policy.seq_len = 96
    w.gold = config_lib.model('tiny', width=32, mlp_width=64, num_layers=1, num_heads=2, num_kv_heads=1)
  return w


def data_config(variant: str = 'tiny', *, flip_prob: float = 0.0) -> ml_collections.ConfigDict:
  """`config.data`: preference pairs sampled from the base policy, labeled by the gold model.

  label: 'gold_order' (chosen = higher gold score) or 'bradley_terry'; flip_prob: share of labels
  flipped (Coste et al. use 0.25). `variant` 'test' is a seconds-long data set.
  """
  d = ml_collections.ConfigDict(dict(num_train=4096, num_eval=512, label='gold_order', flip_prob=flip_prob,
                                     bt_temperature=1.0, max_new_tokens=48, temperature=1.0, seq_len=96,
                                     sample_batch=256))
  if variant == 'test':
    d.update(dict(num_train=256, num_eval=64, max_new_tokens=24, seq_len=64, sample_batch=64))
  return d


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise a `ConfigError` naming the bad field before anything compiles."""
  C = config_lib
  C.require_positive(config, 'world.num_prompts', 'world.num_documents', 'world.policy.seq_len',
                     'data.num_train', 'data.num_eval', 'data.max_new_tokens', 'data.seq_len',
                     'data.sample_batch')
  C.require_choice(config, 'data.label', ('gold_order', 'bradley_terry'))
  C.require_range(config, 'data.flip_prob', 0.0, 0.5)
  C.require_positive(config, 'data.temperature', allow_zero=True)
  C.require_positive(config, 'world.policy.train.steps', 'world.policy.train.batch_size')
  C.require_positive(config, 'world.gold_fluency', allow_zero=True)
  rm_trainer.validate(config)
  if config.data.label == 'bradley_terry' and config.data.flip_prob > 0:
    raise config_lib.ConfigError('config.data.flip_prob > 0 with data.label=bradley_terry stacks label '
                                 'noise on Bradley-Terry sampling; set one of them.')
  if config.data.seq_len <= config.data.max_new_tokens:
    raise config_lib.ConfigError(f'config.data.seq_len={config.data.seq_len} must exceed '
                                 f'data.max_new_tokens={config.data.max_new_tokens} (prompt + response).')
  parallel.mesh_from_config(config.mesh)


def world(config):
  """The fixed prompts of the grammar of `config.seed` (prompt id = index) and the tokenizer."""
  return Grammar.random(config.seed).prompts(config.world.num_prompts, seed=config.seed), ByteTokenizer()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validate(config)
  tfds.disable_progress_bar()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.mesh_from_config(config.mesh)
  prompts, tok = world(config)
  policy_params, policy_cfg = train_policy(config, workdir / 'policy', tok, mesh)
  gold = make_gold(config, workdir / 'gold', policy_params, policy_cfg, prompts, tok)
  data = make_pairs(config, workdir / 'data', policy_params, policy_cfg, gold, prompts, tok)
  _, meta = train_reward_models(config, workdir / 'rm', data, tok, mesh)
  result = meta['eval']
  (workdir / 'rm' / 'eval.json').write_text(json.dumps(result, indent=2, sort_keys=True))
  print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=2, sort_keys=True))
  return result


def _process_share() -> dict:
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def train_policy(config, workdir: pathlib.Path, tok: Tokenizer, mesh):
  """Stage 1: pretrain the base policy on grammar documents. Returns (params, model config)."""
  corpus = sft.grammar_corpus(workdir, int(config.seed), int(config.world.num_documents))
  return sft.pretrain(config.world.policy, workdir, corpus.as_data_source('train'), tok, mesh, config)


def _left_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
  return tokens, mask


def sample_responses(config, policy_params, policy_cfg, prompts: list[str], tok: Tokenizer, split_seed: int,
                     desc: str = 'sampling') -> list[str]:
  """One response per entry of `prompts` (repeat a prompt to draw several), sampled from the policy.

  Runs the KV-cache sampler in batches of `data.sample_batch` rows (the last batch padded with
  copies, so every batch has the same shape) with a progress bar; batch j draws with
  `fold_in(fold_in(key(seed), split_seed), j)`.
  """
  d = config.data
  encoded = [tok.encode(p) for p in prompts]
  width = max(len(e) for e in encoded)
  batch = int(d.sample_batch)
  sample = jax.jit(lambda params, t, m, key: sampling.sample(
      params, policy_cfg, t, m, key, max_new_tokens=int(d.max_new_tokens), temperature=float(d.temperature),
      eos_id=tok.eos_id, pad_id=tok.pad_id))
  key = jax.random.fold_in(jax.random.key(int(config.seed)), split_seed)
  texts = []
  for j, start in enumerate(tqdm.trange(0, len(prompts), batch, desc=f'{desc} ({len(prompts)})', leave=False)):
    rows = encoded[start:start + batch]
    tokens, mask = _left_pad(rows + rows[:1] * (batch - len(rows)), width, tok.pad_id)
    res = jax.device_get(sample(policy_params, tokens, mask, jax.random.fold_in(key, j)))
    texts += [tok.decode(res.tokens[i][res.mask[i]]) for i in range(len(rows))]
  return texts


def sample_candidates(config, policy_params, policy_cfg, prompts: list[str], tok: Tokenizer, num: int, split_seed: int):
  """`num` examples of (prompt_id, prompt, response_a, response_b): two policy samples per prompt,
  prompt ids drawn uniformly from the fixed prompt set."""
  ids = np.random.default_rng([int(config.seed), split_seed]).integers(0, len(prompts), size=num)
  texts = sample_responses(config, policy_params, policy_cfg, [prompts[i] for i in ids for _ in (0, 1)], tok,
                           split_seed, desc='sampling pairs')
  return [(int(i), prompts[i], texts[2 * j], texts[2 * j + 1]) for j, i in enumerate(ids)]


def score_texts(config, rm: RewardModel, params, tok: Tokenizer, pairs: list[tuple[str, str]],
                desc: str = 'scoring') -> np.ndarray:
  """Raw scores `[K, N]` of (prompt, response) texts, tokenized as the pair batches tokenize them."""
  seq_len, bs = int(config.data.seq_len), int(config.data.sample_batch)
  score = jax.jit(rm.apply)
  out = []
  for start in tqdm.trange(0, len(pairs), bs, desc=f'{desc} ({len(pairs)})', leave=False):
    rows = [pipeline.encode_prompt_response(tok, p, r, seq_len)[:2] for p, r in pairs[start:start + bs]]
    n = len(rows)
    rows += rows[:1] * (bs - n)  # fixed shapes: pad the last batch with copies
    tokens, mask = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    out.append(np.asarray(score(params, tokens, mask))[:, :n])
  return np.concatenate(out, axis=1)


@dataclasses.dataclass(frozen=True)
class Gold:
  """The gold reward (module docstring): gold(x, y) = (z(x, y) + w · g(y) − μ) / σ.

  `model`, `params`: the gold network; `net_norm`: z's standardization (mean, std of the
  network's raw score over base-policy samples; the checkpoint's `normalization`, which the RL
  trainer applies to its gold scores); `grammar`: g's grammar; `weight`: w; `mean`, `std`: μ, σ.
  """
  model: RewardModel
  params: Any
  net_norm: objectives.RewardStats
  grammar: Grammar
  weight: float
  mean: float
  std: float

  def net(self, config, tok: Tokenizer, texts: list[tuple[str, str]], desc: str = 'gold scores') -> np.ndarray:
    """z `[N]` of (prompt, response) texts."""
    raw = score_texts(config, self.model, self.params, tok, texts, desc=desc)[0]
    return (raw - self.net_norm.mean[0]) / self.net_norm.std[0]

  def from_net(self, z: np.ndarray, responses: list[str]) -> np.ndarray:
    """gold `[N]` from z `[N]` and the response texts."""
    g = np.array([self.grammar.grammatical_share(r) for r in responses])
    return (np.asarray(z) + self.weight * g - self.mean) / self.std

  def score(self, config, tok: Tokenizer, texts: list[tuple[str, str]], desc: str = 'gold scores') -> np.ndarray:
    """gold `[N]` of (prompt, response) texts."""
    return self.from_net(self.net(config, tok, texts, desc), [r for _, r in texts])


def make_gold(config, workdir: pathlib.Path, policy_params, policy_cfg, prompts, tok: Tokenizer) -> Gold:
  """Stage 2: the gold reward (random network weights from the seed; see the module docstring).

  z's and the sum's standardizations are measured on 256 base-policy responses and saved with
  the network as a self-describing checkpoint in `workdir`, for later stages and studies.
  """
  gold_cfg = config_lib.model_config(config.world.gold, vocab_size=tok.vocab_size)
  model = RewardModel(gold_cfg, num_members=1, kind='full')
  grammar, weight = Grammar.random(config.seed), float(config.world.gold_fluency)

  def build():
    params = model.init(jax.random.fold_in(jax.random.key(int(config.seed)), 0x601D))
    ref = sample_candidates(config, policy_params, policy_cfg, prompts, tok, 128, split_seed=3)
    texts = [(p, r) for _, p, a, b in ref for r in (a, b)]
    raw = score_texts(config, model, params, tok, texts)[0]
    net_norm = objectives.RewardStats(mean=np.array([raw.mean()]), std=np.array([max(raw.std(), 1e-6)]))
    unit = Gold(model, params, net_norm, grammar, weight, mean=0.0, std=1.0)
    total = unit.from_net((raw - net_norm.mean[0]) / net_norm.std[0], [r for _, r in texts])
    return {'params': params}, loop.describe(
        config, kind='reward_model', model=model.to_dict(), tokenizer=tok.to_dict(), role='gold',
        normalization={'mean': net_norm.mean.tolist(), 'std': net_norm.std.tolist()},
        fluency={'weight': weight, 'mean': float(total.mean()), 'std': float(max(total.std(), 1e-6))})

  state, meta = saved_once(workdir, build)
  net_norm = objectives.RewardStats(mean=np.asarray(meta['normalization']['mean']),
                                    std=np.asarray(meta['normalization']['std']))
  f = meta['fluency']
  return Gold(model, jax.tree.map(jnp.asarray, state['params']), net_norm, grammar, weight=f['weight'],
              mean=f['mean'], std=f['std'])


def saved_once(folder: pathlib.Path, build) -> tuple[dict, dict]:
  """`(state, metadata)` of the one-step checkpoint in `folder`, made by `build() -> (state, metadata)`
  and saved first when `folder` holds none."""
  ckpt = checkpoint.Checkpointer(folder, max_to_keep=1, async_save=False)
  try:
    if ckpt.latest_step() is None:
      ckpt.save(0, *build(), force=True)
      ckpt.wait()
  finally:
    ckpt.close()
  return checkpoint.load(folder)


def make_pairs(config, workdir: pathlib.Path, policy_params, policy_cfg, gold, prompts, tok):
  """Stage 3: preference pairs as a TFDS dataset; returns the prepared builder.

  The dataset's key hashes what produced it (seed, world, data settings), so a change there
  writes a new dataset beside the old one instead of reusing stale pairs.
  """
  d = config.data
  key = builders.data_key({'seed': config.seed, 'world': config.world.to_dict(), 'data': d.to_dict()})

  def candidates(split):
    num, split_seed = (int(d.num_train), 1) if split == 'train' else (int(d.num_eval), 2)
    rows = sample_candidates(config, policy_params, policy_cfg, prompts, tok, num, split_seed)
    scores = gold.score(config, tok, [(p, r) for _, p, a, b in rows for r in (a, b)])
    for (pid, prompt, a, b), ga, gb in zip(rows, scores[0::2], scores[1::2]):
      yield pid, prompt, a, b, float(ga), float(gb)

  builder = builders.SyntheticPreferences(
      data_dir=str(workdir), key=f'pairs_{key}', candidates=candidates, label=d.label, flip_prob=float(d.flip_prob),
      bt_temperature=float(d.bt_temperature), seed=int(config.seed),
      split_sizes={'train': int(d.num_train), 'eval': int(d.num_eval)})
  builder.download_and_prepare()
  return builder


class _Head:
  """The first `n` rows of a random-access source."""

  def __init__(self, source, n: int):
    if not 0 < n <= len(source):
      raise ValueError(f'_Head: n={n} is not in 1..{len(source)} (the rows of the source).')
    self.source, self.n = source, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= index < self.n:
      raise IndexError(f'row {index} of the first {self.n}')
    return self.source[index]


def train_reward_models(config, workdir: pathlib.Path, data, tok: Tokenizer, mesh, init_backbone=None,
                        num_train: int | None = None):
  """Stage 4: the ensemble on the train split (its first `num_train` pairs when given); returns
  (params, final checkpoint metadata).

  The final metadata holds each member's normalization and the held-out eval metrics.
  """
  model_cfg = config_lib.model_config(config.model, vocab_size=tok.vocab_size)
  source = data.as_data_source('train')
  train_batches = pipeline.PairBatches(source if num_train is None else _Head(source, num_train), tok,
                                       seq_len=int(config.data.seq_len),
                                       global_batch_size=int(config.train.batch_size), seed=int(config.seed),
                                       **_process_share())
  eval_batches = eval_pairs(config, data, tok)
  return rm_trainer.train(config, workdir, model_config=model_cfg, train_batches=train_batches,
                          eval_batches=eval_batches, reference_batches=eval_batches, mesh=mesh, tokenizer=tok,
                          init_backbone=init_backbone)


def eval_pairs(config, data, tok: Tokenizer) -> pipeline.PairBatches:
  """The held-out pairs in batches of `eval.batch_size`, one pass in order: they evaluate the reward
  models, and their responses (base-policy samples) give each model's normalization."""
  return pipeline.PairBatches(data.as_data_source('eval'), tok, seq_len=int(config.data.seq_len),
                              global_batch_size=int(config.eval.batch_size), seed=int(config.seed), shuffle=False,
                              drop_remainder=False, **_process_share())
