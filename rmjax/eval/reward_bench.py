"""RewardBench-style evaluation of a reward model or ensemble on (prompt, chosen, rejected, subset) rows.

Scores: every response is encoded as `prompt + response + eos` (`encode_prompt_response`, or
through the chat template: the prompt as a user turn), scored by `RewardModel.apply`, which
reads each row at the last True of its attention mask, never at a searched-for pad id
(`shared/PITFALLS.md` #12). Rows go through one jitted program of a fixed batch size; the
last batch is filled with copies whose scores are dropped.

Metrics, with member scores normalized by the saved statistics when there are some and
aggregated over members by a registered aggregation (`rmjax.objectives`, e.g. 'mean', 'min'):

  accuracy        share of pairs with agg(chosen) > agg(rejected), per subset, per section
                  and overall. A section's accuracy is the example-weighted mean of its
                  subsets, except Reasoning, where math-prm and the pooled hep-* subsets
                  weigh equally (as RewardBench scores it). Unknown subsets go to 'Other'.
  ECE             expected calibration error of p = sigmoid(agg_c - agg_r) as the
                  probability that chosen is preferred: with confidence c = max(p, 1 - p)
                  and correct = [p > 1/2], ECE = sum_b n_b / N |acc_b - conf_b| over
                  `num_bins` equal bins of c on [1/2, 1] (Guo et al. 2017, "On Calibration
                  of Modern Neural Networks"). The reliability diagram is written as a PNG.
  disagreement    (K > 1) per pair the std over members of their normalized margins, and
                  whether the members disagree on the sign; means per subset and overall.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import objectives
from rmjax.data.chat import ChatTemplate
from rmjax.data.pipeline import encode_prompt_response
from rmjax.data.tokenizer import Tokenizer
from rmjax.models.reward_model import RewardModel

SECTIONS = {
    'Chat': ('alpacaeval-easy', 'alpacaeval-length', 'alpacaeval-hard', 'mt-bench-easy', 'mt-bench-med'),
    'Chat Hard': ('mt-bench-hard', 'llmbar-natural', 'llmbar-adver-neighbor', 'llmbar-adver-GPTInst',
                  'llmbar-adver-GPTOut', 'llmbar-adver-manual'),
    'Safety': ('refusals-dangerous', 'refusals-offensive', 'xstest-should-refuse', 'xstest-should-respond',
               'donotanswer'),
    'Reasoning': ('math-prm', 'hep-cpp', 'hep-go', 'hep-java', 'hep-js', 'hep-python', 'hep-rust'),
}
REQUIRED_FIELDS = ('prompt', 'chosen', 'rejected', 'subset')


def encode(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str], seq_len: int, *,
           chat_template: ChatTemplate | None = None, padding_side: str = 'right') -> tuple[np.ndarray, np.ndarray]:
  """tokens, mask `[N, seq_len]` of prompt + response + eos (or the template's rendering), padded on one side."""
  if padding_side not in ('left', 'right'):
    raise ValueError(f'padding_side={padding_side!r}: expected "left" or "right".')
  tokens, mask = [], []
  for prompt, response in zip(prompts, responses, strict=True):
    if chat_template is not None:
      prompt, response = chat_template.split([{'role': 'user', 'content': prompt},
                                              {'role': 'assistant', 'content': response}])
    t, m, _ = encode_prompt_response(tokenizer, prompt, response, seq_len)
    if padding_side == 'left':
      shift = seq_len - int(m.sum())
      t, m = np.roll(t, shift), np.roll(m, shift)
    tokens.append(t)
    mask.append(m)
  return np.stack(tokens), np.stack(mask)


def score(rm: RewardModel, params: Any, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
  """Raw member scores `[K, N]` in batches of `batch_size` rows (one compiled program)."""
  n = tokens.shape[0]
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: must be positive.')
  apply = jax.jit(rm.apply)
  pad = -n % batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
  out = [np.asarray(apply(params, jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(mask[i:i + batch_size])))
         for i in range(0, n + pad, batch_size)]
  return np.concatenate(out, axis=1)[:, :n]


def normalize(scores: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
  """(r - mean[k]) / std[k] per member `[K, N]`; unchanged without statistics."""
  if stats is None:
    return scores
  mean, std = (np.asarray(s, np.float64).reshape(-1, 1) for s in stats)
  return (scores - mean) / std


def section_of(subset: str) -> str:
  return next((name for name, subsets in SECTIONS.items() if subset in subsets), 'Other')


def section_accuracies(correct: np.ndarray, subsets: Sequence[str]) -> dict[str, float]:
  """Per section: example-weighted accuracy of its subsets; Reasoning = mean(math-prm, pooled hep-*)."""
  subsets = np.asarray(subsets)
  out = {}
  for name in [*SECTIONS, 'Other']:
    member = np.array([section_of(s) == name for s in subsets])
    if not member.any():
      continue
    if name == 'Reasoning':
      parts = [correct[subsets == 'math-prm'], correct[member & (subsets != 'math-prm')]]
      out[name] = float(np.mean([p.mean() for p in parts if p.size]))
    else:
      out[name] = float(correct[member].mean())
  return out


def expected_calibration_error(p: np.ndarray, num_bins: int = 10) -> tuple[float, list[dict[str, float]]]:
  """ECE of p = P(chosen preferred) with every label "chosen"; also the per-bin table (module docstring)."""
  p = np.asarray(p, np.float64)
  conf, correct = np.maximum(p, 1 - p), (p > 0.5).astype(np.float64)
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  index = np.clip(np.searchsorted(edges, conf, side='right') - 1, 0, num_bins - 1)
  ece, bins = 0.0, []
  for b in range(num_bins):
    sel = index == b
    if not sel.any():
      continue
    acc, c = float(correct[sel].mean()), float(conf[sel].mean())
    ece += sel.mean() * abs(acc - c)
    bins.append({'low': float(edges[b]), 'high': float(edges[b + 1]), 'count': int(sel.sum()), 'accuracy': acc,
                 'confidence': c})
  return float(ece), bins


def evaluate(r_chosen: np.ndarray, r_rejected: np.ndarray, subsets: Sequence[str], *, aggregate: str = 'mean',
             stats: tuple[np.ndarray, np.ndarray] | None = None, num_bins: int = 10) -> dict[str, Any]:
  """All metrics from raw member scores `[K, N]` of chosen and rejected responses."""
  rc, rr = normalize(r_chosen, stats), normalize(r_rejected, stats)
  agg = objectives.get(aggregate)
  margin = np.asarray(agg(jnp.asarray(rc, jnp.float32))) - np.asarray(agg(jnp.asarray(rr, jnp.float32)))
  correct = (margin > 0).astype(np.float64)
  subsets = list(subsets)
  names = sorted(set(subsets))
  sub = np.asarray(subsets)
  ece, bins = expected_calibration_error(1 / (1 + np.exp(-margin)), num_bins)
  results: dict[str, Any] = {
      'num_pairs': len(subsets), 'num_members': int(rc.shape[0]), 'aggregate': aggregate,
      'normalized': stats is not None, 'accuracy': float(correct.mean()),
      'subsets': {s: {'accuracy': float(correct[sub == s].mean()), 'count': int((sub == s).sum()),
                      'section': section_of(s)} for s in names},
      'sections': section_accuracies(correct, subsets), 'ece': ece, 'reliability': bins,
  }
  if rc.shape[0] > 1:
    member_margin = rc - rr
    spread = member_margin.std(axis=0)
    split = np.any(member_margin > 0, axis=0) & np.any(member_margin <= 0, axis=0)
    results['disagreement'] = {'margin_std': float(spread.mean()), 'sign_disagreement': float(split.mean()),
                               'member_accuracy': [float(a) for a in (member_margin > 0).mean(axis=1)]}
    for s in names:
      results['subsets'][s]['margin_std'] = float(spread[sub == s].mean())
      results['subsets'][s]['sign_disagreement'] = float(split[sub == s].mean())
  return results


def markdown(results: Mapping[str, Any]) -> str:
  """The results as markdown tables: sections, then subsets."""
  ens = results['num_members'] > 1
  lines = [f'# Reward-model evaluation ({results["num_pairs"]} pairs, {results["num_members"]} member(s), '
           f'aggregate `{results["aggregate"]}`)', '',
           f'Accuracy {results["accuracy"]:.4f} · ECE {results["ece"]:.4f}', '', '| section | accuracy |', '|---|---|']
  lines += [f'| {name} | {acc:.4f} |' for name, acc in results['sections'].items()]
  head = '| subset | section | pairs | accuracy |' + (' margin std | sign disagreement |' if ens else '')
  lines += ['', head, '|---|---|---|---|' + ('---|---|' if ens else '')]
  for name, r in results['subsets'].items():
    row = f'| {name} | {r["section"]} | {r["count"]} | {r["accuracy"]:.4f} |'
    if ens:
      row += f' {r["margin_std"]:.4f} | {r["sign_disagreement"]:.4f} |'
    lines.append(row)
  return '\n'.join(lines) + '\n'


def reliability_plot(bins: Sequence[Mapping[str, float]], path: str | pathlib.Path, title: str = '') -> None:
  """Reliability diagram: accuracy against mean confidence per bin, and the diagonal."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot([0.5, 1], [0.5, 1], '--', color='gray', label='perfect calibration')
  width = [b['high'] - b['low'] for b in bins]
  ax.bar([b['low'] for b in bins], [b['accuracy'] for b in bins], width=width, align='edge', alpha=0.6,
         edgecolor='k', label='accuracy')
  ax.plot([b['confidence'] for b in bins], [b['accuracy'] for b in bins], 'o-', color='C3', label='per bin')
  ax.set(xlim=(0.5, 1), ylim=(0, 1), xlabel='confidence max(p, 1 - p)', ylabel='accuracy', title=title)
  ax.legend(loc='upper left', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_pairs(path: str | pathlib.Path) -> dict[str, list[str]]:
  """The RewardBench columns of a .jsonl / .jsonl.gz / .json / .parquet file; a bad row raises with file:line."""
  from rmjax.data.hf_datasets import read_rows
  out: dict[str, list[str]] = {f: [] for f in REQUIRED_FIELDS}
  for where, row in read_rows(path):
    for f in REQUIRED_FIELDS:
      if not isinstance(row.get(f), str):
        raise ValueError(f'{where}: field "{f}" must be a string (RewardBench rows have {list(REQUIRED_FIELDS)}).')
      out[f].append(row[f])
  if not out['prompt']:
    raise ValueError(f'{path}: no rows.')
  return out


def write(results: Mapping[str, Any], workdir: str | pathlib.Path) -> None:
  """results.json, results.md and reliability.png in `workdir`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'results.json').write_text(json.dumps(results, indent=2))
  (workdir / 'results.md').write_text(markdown(results))
  reliability_plot(results['reliability'], workdir / 'reliability.png', f'ECE = {results["ece"]:.3f}')


def load_model(config) -> tuple[RewardModel, Any, tuple[np.ndarray, np.ndarray] | None, Tokenizer,
                                ChatTemplate | None]:
  """(model, params, normalization, tokenizer, chat template) named by `config.model` / `config.tokenizer`.

  model.source 'hf': sequence-classification folder(s) (`rmjax.models.hf.load_reward_model`);
  the tokenizer folder defaults to the model folder (its first member for an ensemble).
  'checkpoint': an rmjax reward-model checkpoint (its metadata holds model, tokenizer, statistics).
  """
  from rmjax.data import chat
  from rmjax.data.tokenizer import tokenizer_from_dict
  from rmjax.models import hf
  from rmjax.train import checkpoint
  path = pathlib.Path(config.model.path)
  template = None
  if config.model.source == 'hf':
    loaded = hf.load_reward_model(path, dtype=config.model.dtype)
    rm, params, stats = loaded.model, loaded.params, loaded.normalization
    tok_dir = pathlib.Path(config.tokenizer) if config.tokenizer else (
        path / f'{hf.MEMBER_PREFIX}0' if (path / f'{hf.MEMBER_PREFIX}0').is_dir() else path)
    tokenizer, template = chat.load_tokenizer(tok_dir)
  else:
    state, meta = checkpoint.load(path)
    if meta.get('kind') != 'reward_model':
      raise ValueError(f'{path}: not a reward-model checkpoint (kind={meta.get("kind")!r}).')
    rm, params = RewardModel.from_dict(meta['model']), state['params']
    norm = meta.get('normalization')
    stats = None if norm is None else (np.asarray(norm['mean']), np.asarray(norm['std']))
    if config.tokenizer:
      tokenizer, template = chat.load_tokenizer(config.tokenizer)
    else:
      tokenizer = tokenizer_from_dict(meta['tokenizer'])
  if not config.data.chat_template:
    template = None
  elif template is None:
    raise ValueError('config.data.chat_template=True, but the tokenizer folder has no chat template; set it to '
                     'False or give config.tokenizer= a folder with one.')
  return rm, params, stats, tokenizer, template


def validate(config) -> None:
  from rmjax import config as C
  C.require_choice(config, 'model.source', ('hf', 'checkpoint'))
  C.require_choice(config, 'model.dtype', ('float32', 'bfloat16'))
  C.require_choice(config, 'eval.aggregate', [e.name for e in objectives.entries('aggregation')])
  C.require_choice(config, 'eval.padding_side', ('left', 'right'))
  C.require_positive(config, 'eval.batch_size', 'eval.seq_len', 'eval.num_bins')
  for field in ('model.path', 'data.path'):
    if not C.get(config, field):
      raise C.ConfigError(f'config.{field} is empty; give --config.{field}=PATH.')


def run(config, workdir: str) -> dict[str, Any]:
  """Scores the pairs of `config.data.path`, writes results.json / results.md / reliability.png."""
  validate(config)
  rm, params, stats, tokenizer, template = load_model(config)
  pairs = read_pairs(config.data.path)
  n = len(pairs['prompt'])
  tokens, mask = encode(tokenizer, pairs['prompt'] * 2, pairs['chosen'] + pairs['rejected'], config.eval.seq_len,
                        chat_template=template, padding_side=config.eval.padding_side)
  scores = score(rm, params, tokens, mask, config.eval.batch_size)
  results = evaluate(scores[:, :n], scores[:, n:], pairs['subset'], aggregate=config.eval.aggregate,
                     stats=stats if config.eval.normalize else None, num_bins=config.eval.num_bins)
  write(results, workdir)
  print(markdown(results))
  return results
