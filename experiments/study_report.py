"""The study's outputs: `results.json`, PNG plots and `report.md` in the workdir."""
from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rmjax.eval import fits  # noqa: E402


def _plot(curves: list[dict], path: pathlib.Path, title: str) -> None:
  """Gold and proxy reward against √KL per method (Gao et al. Fig. 1 style), 95% CI bands."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
  for c in curves:
    d = np.sqrt(c['kl'])
    for ax, key in zip(axes, ('gold_reward', 'proxy_reward')):
      line, = ax.plot(d, c[key], marker='o', ms=3, label=c.get('label', _name(c)))
      lo, hi = c[f'{key}_ci']
      ax.fill_between(d, lo, hi, color=line.get_color(), alpha=0.15)
  for ax, name in zip(axes, ('gold reward', 'proxy reward')):
    ax.axhline(0.0, color='gray', lw=0.8)
    ax.set_xlabel('√KL (nats^½)')
    ax.set_ylabel(f'{name} − base policy (std units)')
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _name(curve: dict) -> str:
  """A curve's method, marked when its ensemble's members differ by pretraining seed."""
  return curve['method'] + (' (pretrain)' if curve.get('ensemble') == 'pretrain' else '')


def _agreement(ev: dict) -> str:
  """'mean 0.700 (members 0.650, ...)' from a reward model's held-out metrics."""
  members = [f'{v:.3f}' for k, v in sorted(ev.items()) if k.startswith('eval/gold_accuracy_')]
  return f'{ev["eval/gold_accuracy"]:.3f}' + (f' (members {", ".join(members)})' if members else '')


def _form(fit: dict) -> str:
  """', bon form' when a fit names the form it chose (DPO), else ''."""
  return f', {fit["form"]} form' if 'form' in fit else ''


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
  return f'{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]'


def _table(curves: list[dict]) -> list[str]:
  rows = ['| method | peak gold [95% CI] | KL at peak | gold at largest KL [95% CI] | proxy at largest KL | '
          'length at largest KL | grammatical at largest KL | fit α, β (R²) |', '|---|---|---|---|---|---|---|---|']
  for c in curves:
    g = np.asarray(c['gold_reward'])
    lo, hi = (np.asarray(x) for x in c['gold_reward_ci'])
    i = int(np.argmax(g))
    f = c['fits']['gold']
    rows.append(f'| {_name(c)} | {_fmt_ci(g[i], lo[i], hi[i])} | {c["kl"][i]:.2f} | '
                f'{_fmt_ci(g[-1], lo[-1], hi[-1])} | {c["proxy_reward"][-1]:+.3f} | {c["length"][-1]:.1f} | '
                f'{c["grammatical"][0]:.2f} → {c["grammatical"][-1]:.2f} | '
                f'{f["alpha"]:.3f}, {f["beta"]:.3f} ({f["r2"]:.2f}) |')
  return rows


def _common_kl(curves: list[dict]) -> list[str]:
  kls = curves[0]['kl']
  rows = ['| KL | ' + ' | '.join(_name(c) for c in curves) + ' |', '|---' * (len(curves) + 1) + '|']
  for j, kl in enumerate(kls):
    rows.append(f'| {kl:.2f} (plug-in {curves[0]["kl_plugin"][j]:.2f}) | '
                + ' | '.join(f'{c["gold_reward"][j]:+.3f}' for c in curves) + ' |')
  return rows


def seed_groups(curves: list[dict]) -> list[dict]:
  """RL curves of one (method, kl_coef) over seeds -> one curve: per step the mean over seeds of
  KL, rewards and length, 95% bootstrap intervals over seeds, the seed-mean fit, and the final
  gold of each seed."""
  groups: dict[tuple, list[dict]] = {}
  for c in curves:
    groups.setdefault((c['method'], c['ensemble'], c['kl_coef']), []).append(c)
  out = []
  for (method, ensemble, beta), members in groups.items():
    n = min(len(c['step']) for c in members)
    g = {'method': method, 'kl_coef': beta, 'seeds': [c['seed'] for c in members], 'step': members[0]['step'][:n],
         'ensemble': ensemble, 'label': f'{_name(members[0])} β={beta:g}', 'examples': members[0]['examples']}
    for key in ('kl', 'proxy_reward', 'gold_reward', 'length', 'grammatical'):
      values = np.asarray([c[key][:n] for c in members], np.float64)  # [seeds, steps]
      mean, lo, hi = fits.bootstrap_ci(values, axis=0)
      g[key], g[f'{key}_ci'] = mean.tolist(), [lo.tolist(), hi.tolist()]
    fit = (lambda kl, r: fits.best(kl, r)) if method == 'dpo' else (lambda kl, r: fits.fit(kl, r, 'rl'))
    g['fits'] = {key: fit(g['kl'], g[f'{key}_reward']) for key in ('gold', 'proxy')}
    g['final_gold_per_seed'] = [c['gold_reward'][n - 1] for c in members]
    out.append(g)
  return out


def _rl_table(groups: list[dict]) -> list[str]:
  rows = ['| method | KL coef | seeds | peak gold | KL at peak | final KL | final gold [95% CI over seeds] | '
          'final proxy | final length | grammatical | fit α, β (R²) |', '|---' * 11 + '|']
  for g in groups:
    gold = np.asarray(g['gold_reward'])
    i = int(np.argmax(gold))
    lo, hi = (x[-1] for x in g['gold_reward_ci'])
    f = g['fits']['gold']
    rows.append(f'| {_name(g)} | {g["kl_coef"]:g} | {len(g["seeds"])} | {gold[i]:+.3f} | {g["kl"][i]:.2f} | '
                f'{g["kl"][-1]:.2f} | {_fmt_ci(gold[-1], lo, hi)} | {g["proxy_reward"][-1]:+.3f} | '
                f'{g["length"][-1]:.1f} | {g["grammatical"][0]:.2f} → {g["grammatical"][-1]:.2f} | '
                f'{f["alpha"]:.3f}, {f["beta"]:.3f} ({f["r2"]:.2f}{_form(f)}) |')
  return rows


def _rl_common_kl(curves: list[dict], groups: list[dict], points: int = 5) -> list[str]:
  """Gold reward interpolated at KL values every curve reaches, mean over seeds (per seed: its own curve)."""
  reach = min(max(c['kl']) for c in curves)
  kls = np.linspace(0, reach, points + 1)[1:]
  rows = ['| KL | ' + ' | '.join(g['label'] for g in groups) + ' |', '|---' * (len(groups) + 1) + '|']
  for kl in kls:
    cells = []
    for g in groups:
      seeds = [c for c in curves if (c['method'], c['ensemble'], c['kl_coef']) == (g['method'], g['ensemble'],
                                                                                  g['kl_coef'])]
      vals = [np.interp(kl, np.maximum.accumulate(c['kl']), c['gold_reward']) for c in seeds]
      cells.append(f'{np.mean(vals):+.3f}')
    rows.append(f'| {kl:.2f} | ' + ' | '.join(cells) + ' |')
  return rows


def _trained_section(title: str, name: str, curves: list[dict], workdir: pathlib.Path,
                     seed: int) -> tuple[list[str], pathlib.Path]:
  """The report's section for trained policies (RL or DPO curves over saved steps) and its plot."""
  groups = seed_groups(curves)
  plot = workdir / f'{name}_gold_proxy.png'
  _plot(groups, plot, f'{title}, seed {seed}: gold vs proxy reward against √KL (mean over seeds)')
  lines = [f'## {title}', '',
           'KL is the held-out mean of Σ_t (log π − log π_ref) on the policy\'s samples at each saved step; '
           'bands and intervals: bootstrap over seeds.' + (' DPO optimizes no proxy: "proxy" is the single '
                                                           'proxy\'s reward; "KL coef" is DPO\'s β.'
                                                           if name == 'dpo' else ''), '',
           f'![{title}]({plot.name})', '', *_rl_table(groups), '',
           '### Gold reward at common KL values (interpolated per seed, mean over seeds)', '',
           *_rl_common_kl(curves, groups), '', '### Samples at the first and last step', '']
  for g in groups:
    lines += [f'**{g["label"]}** (seed {g["seeds"][0]})', '']
    lines += [f'- {e["which"]} — gold {e["gold"]:+.2f}: `{e["prompt"]}` → `{e["response"].strip()}`'
              for e in g['examples']]
    lines.append('')
  return lines, plot


def _sizes_section(sweep: list[dict], workdir: pathlib.Path, seed: int) -> tuple[list[str], pathlib.Path]:
  """The proxy-size and data-size sweep: a table of each point and a plot of its best-of-n gold
  curves and of the gold fit's α and β against proxy parameters (Gao et al. 2022, Fig. 3)."""
  sizes = sorted({c['proxy_params'] for c in sweep})
  data_sizes = sorted({c['num_train'] for c in sweep})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = dict(zip(sizes, plt.rcParams['axes.prop_cycle'].by_key()['color']))
  for c in sorted(sweep, key=lambda c: (c['proxy_params'], c['num_train'])):
    axes[0].plot(np.sqrt(c['kl']), c['gold_reward'], marker='o', ms=3, color=colors[c['proxy_params']],
                 ls='-' if c['num_train'] == data_sizes[-1] else '--',
                 label=f'{c["proxy_size"]} ({c["proxy_params"]:,}), {c["num_train"]} pairs')
  for n in data_sizes:
    points = sorted((c['proxy_params'], c['fits']['gold']) for c in sweep if c['num_train'] == n)
    for ax, key in zip(axes[1:], ('alpha', 'beta')):
      ax.plot([p for p, _ in points], [f[key] for _, f in points], marker='o', label=f'{n} pairs')
  axes[0].set(xlabel='√KL (nats^½)', ylabel='gold reward − base policy (std units)', title='best-of-n gold reward')
  for ax, key in zip(axes[1:], ('α', 'β')):
    ax.set(xscale='log', xlabel='proxy parameters', ylabel=key, title=f'gold fit {key}: R(d) = d(α − βd)')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'proxy size and data size, seed {seed}')
  fig.tight_layout()
  path = workdir / 'bon_sizes.png'
  fig.savefig(path, dpi=110)
  plt.close(fig)
  rows = ['| proxy (width x layers) | parameters | pairs | agreement | peak gold [95% CI] | KL at peak | '
          'gold at largest KL | gold fit α, β (R²) |', '|---|---|---|---|---|---|---|---|']
  for c in sorted(sweep, key=lambda c: (c['num_train'], c['proxy_params'])):
    g, (lo, hi), f = np.asarray(c['gold_reward']), c['gold_reward_ci'], c['fits']['gold']
    i = int(np.argmax(g))
    rows.append(f'| {c["proxy_size"]} | {c["proxy_params"]:,} | {c["num_train"]} | {c["agreement"]:.3f} | '
                f'{_fmt_ci(g[i], lo[i], hi[i])} | {c["kl"][i]:.2f} | {g[-1]:+.3f} | '
                f'{f["alpha"]:.3f}, {f["beta"]:.3f} ({f["r2"]:.2f}) |')
  lines = ['## Proxy size and data size', '',
           'Single proxies of each size, each on a language model of its size pretrained like the policy, '
           'trained on the first n training pairs (as many passes over them as the study\'s proxies make) and '
           'optimized by best-of-n on the same samples. Gao et al. find α and β changing smoothly (about '
           'logarithmically) with proxy parameters, and larger proxies reaching a higher gold peak.', '',
           f'![proxy sizes]({path.name})', '', *rows, '']
  return lines, path


def write(config, workdir: pathlib.Path, stages: dict, sweep: list[dict] = ()) -> dict:
  """Write the outputs from the finished stages and the size sweep's curves; returns their paths."""
  curves = stages['curves'].result['curves']
  rl_curves = [c for name, st in stages.items() if name.startswith('rl_') for c in st.result]
  dpo_curves = stages['dpo'].result if 'dpo' in stages else []
  results = {'curves': [{k: v for k, v in c.items() if k != 'examples'} for c in curves + rl_curves + dpo_curves],
             'size_sweep': [{k: v for k, v in c.items() if k != 'examples'} for c in sweep],
             'proxy_eval': stages['proxies'].result, 'seed': int(config.seed)}
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  plot = workdir / 'bon_gold_proxy.png'
  _plot(curves, plot, f'best-of-n, seed {config.seed}: gold vs proxy reward against √KL')
  plots = [plot]
  sections = []
  for title, name, chosen in (('RL (RLOO)', 'rl', rl_curves), ('DPO', 'dpo', dpo_curves)):
    if chosen:
      section, path = _trained_section(title, name, chosen, workdir, int(config.seed))
      sections += section
      plots.append(path)
  if sweep:
    section, path = _sizes_section(list(sweep), workdir, int(config.seed))
    sections += section
    plots.append(path)
  lines = [
      '# Reward-model overoptimization on the synthetic world', '',
      f'Seed {config.seed}. Gold and proxy rewards are relative to the base policy (R(0) = 0) in units of each '
      "model's std on base-policy samples; best-of-n KL is log n − (n−1)/n (plug-in value over the distinct "
      'samples in the KL table). 95% intervals: bootstrap over held-out prompts. "Grammatical": the mean '
      'share of response sentences that parse under the world\'s grammar, base policy → largest KL.', '',
      '## Proxies', '',
      f'Held-out agreement with the gold\'s noiseless ordering (labels in training had '
      f'{config.data.flip_prob:.0%} flipped):', '',
      *(f'- {label}: {_agreement(stages[name].result)}' for name, label in (
          ('proxies', 'finetune-seed ensemble'), ('warm', 'WARM'), ('proxies_pretrain', 'pretrain-seed ensemble'))
        if name in stages), '',
      '## Best-of-n', '', f'![best-of-n]({plot.name})', '', *_table(curves), '',
      '### Gold reward at common KL values', '', *_common_kl(curves), '',
      '### Samples at low and high KL', '']
  for c in curves:
    lines.append(f'**{_name(c)}**')
    lines.append('')
    for e in c['examples']:
      lines.append(f'- {e["which"]} — proxy {e["proxy"]:+.2f}, gold {e["gold"]:+.2f}: '
                   f'`{e["prompt"]}` → `{e["response"].strip()}`')
    lines.append('')
  lines += sections
  lines += ['## Stages', '', '| stage | wall time (s) | cached |', '|---|---|---|']
  lines += [f'| {s.name} | {s.wall_s:.1f} | {"yes" if s.skipped else "no"} |' for s in stages.values()]
  report = workdir / 'report.md'
  report.write_text('\n'.join(lines) + '\n')
  return {'report': str(report), 'results': str(workdir / 'results.json'), 'plots': [str(p) for p in plots]}
