"""The best-of-n job (`configs/bon.py`): one sampling pass of N draws per prompt, curves for many n.

Writes `workdir/bon.json`: for each n in `config.bon.ns`, the unbiased expected proxy (and gold,
when `config.gold.path` is set) score of best-of-n, `kl_bound(n)` and the mean plug-in KL over the
distinct draws of each prompt. Models, prompts and re-tokenization as in `rmjax.rl.trainer`; the
gold score is standardized by the gold checkpoint's normalization, as the trainer reports it.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from rmjax import config as config_lib
from rmjax.data.synthetic_language import Grammar
from rmjax.data.tokenizer import ByteTokenizer
from rmjax.models import transformer
from rmjax.rl import best_of_n as bon
from rmjax.rl import trainer


def run(config, workdir: str) -> dict:
  """Samples `config.bon.num_samples` draws per held-out prompt and writes the best-of-n curves."""
  big_n, ns = int(config.bon.num_samples), [int(n) for n in str(config.bon.ns).split(',')]
  if any(not 1 <= n <= big_n for n in ns):
    raise config_lib.ConfigError(f'config.bon.ns={config.bon.ns!r}: every n must be in [1, num_samples={big_n}].')
  key = jax.random.key(int(config.seed))
  if config.policy.path:
    params, policy_cfg, tok_dict = trainer.load_policy(config.policy.path)
    tok = trainer.policy_tokenizer(tok_dict)
  else:
    tok = ByteTokenizer()
    policy_cfg = config_lib.model_config(config.policy.model, vocab_size=tok.vocab_size)
    params = transformer.init_lm(jax.random.fold_in(key, 1), policy_cfg)
  widths = (int(config.data.prompt_len), int(config.bon.max_new_tokens))
  if config.reward.path:
    scorer, reward_params, stats = trainer.reward_scorer(config.reward, tok, *widths)
  else:
    reward_params, stats, scorer = (), None, trainer.token_count_scorer(int(config.reward.toy_token))
  gold_scorer = gold_params = None
  if config.gold.path:
    gold_scorer, gold_params, _ = trainer.reward_scorer(config.gold, tok, *widths, normalized=True)
  texts = Grammar.random(int(config.data.seed)).prompts(int(config.data.num_eval), seed=int(config.data.seed) + 1)
  tokens, mask = trainer.left_pad([tok.encode(t) for t in texts], int(config.data.prompt_len), tok.pad_id)
  out = jax.device_get(bon.best_of_n(
      params, policy_cfg, scorer, reward_params, bon.objective_reward(config.objective, stats), tokens, mask,
      jax.random.fold_in(key, 5), n=big_n, chunk=int(config.bon.chunk), max_new_tokens=int(config.bon.max_new_tokens),
      temperature=float(config.bon.temperature), eos_id=tok.eos_id, pad_id=tok.pad_id, gold_scorer=gold_scorer,
      gold_params=gold_params))
  ids = [bon.distinct_ids(out.samples[p], out.sample_mask[p]) for p in range(len(texts))]
  result = {'n': ns, 'kl_bound': bon.kl_bound(ns).tolist(),
            'kl_plugin': [float(np.mean([bon.plugin_kl(out.rewards[p], ids[p], n) for p in range(len(texts))]))
                          for n in ns],
            'proxy': bon.expected_best_of_n(out.rewards, out.rewards, ns).mean(0).tolist()}
  if out.gold is not None:
    result['gold'] = bon.expected_best_of_n(out.rewards, out.gold, ns).mean(0).tolist()
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'bon.json').write_text(json.dumps(result, indent=2))
  return result
