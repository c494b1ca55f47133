"""What the large-model options cost and save: `python -m benchmarks.memory [--sizes small] [--time]`.

For the reward-model training step (AdamW, one member, Bradley–Terry) at each size and each
option of docs/scaling.md — plain, `model.remat='block'`, `model.scan_layers`, both,
bf16 params and compute with `optim.master_dtype='float32'`, `train.grad_accum_steps` 2 and 4 —
XLA's own memory plan of the compiled step (`Compiled.memory_analysis()`, nothing allocated):

  arguments: the state (params, optimizer moments, master weights) and the batch;
  temp: every buffer alive inside the step (activations kept for the backward pass, gradients,
    workspace) — what remat and accumulation are meant to shrink;

and the compile time. `--time` also runs each step (median of `--repeats` after one warm-up).
A row's numbers are XLA:CPU's plan; an accelerator backend plans its own, so read the ratios
between rows. Prints a table and writes `benchmarks/results/memory-<time>.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import config as config_lib
from rmjax import objectives
from rmjax.models.config import get_size
from rmjax.models.reward_model import RewardModel
from rmjax.train import optim, rm_trainer
from rmjax.train import state as state_lib

RESULTS = Path(__file__).resolve().parent / 'results'
# name -> (model overrides, optim.master_dtype, grad_accum_steps)
OPTIONS = {
    'plain': ({}, 'none', 1),
    'remat': ({'remat': 'block'}, 'none', 1),
    'scan': ({'scan_layers': True}, 'none', 1),
    'scan+remat': ({'scan_layers': True, 'remat': 'block'}, 'none', 1),
    'bf16+master': ({'dtype': 'bfloat16', 'param_dtype': 'bfloat16'}, 'float32', 1),
    'accum 2': ({}, 'none', 2),
    'accum 4': ({}, 'none', 4),
}
BATCH = {'tiny': (32, 256), 'small': (32, 256)}  # pairs, tokens


def abstract_batch(pairs: int, tokens: int) -> dict:
  tok = jax.ShapeDtypeStruct((pairs, tokens), jnp.int32)
  mask = jax.ShapeDtypeStruct((pairs, tokens), jnp.bool_)
  return dict(chosen_tokens=tok, rejected_tokens=tok, chosen_mask=mask, rejected_mask=mask,
              weight=jax.ShapeDtypeStruct((pairs,), jnp.float32), index=jax.ShapeDtypeStruct((pairs,), jnp.int64))


def real_batch(pairs: int, tokens: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  mask = np.ones((pairs, tokens), bool)
  return dict(chosen_tokens=rng.integers(3, vocab, (pairs, tokens)).astype(np.int32),
              rejected_tokens=rng.integers(3, vocab, (pairs, tokens)).astype(np.int32),
              chosen_mask=mask, rejected_mask=mask, weight=np.ones(pairs, np.float32),
              index=np.arange(pairs, dtype=np.int64))


def measure(size: str, option: str, *, run: bool, repeats: int) -> dict:
  overrides, master, accum = OPTIONS[option]
  rm = RewardModel(get_size(size, **overrides), num_members=1, kind='full')
  optim_config = config_lib.optim(lr=1e-4, warmup_steps=0)
  optim_config.master_dtype = master
  opt = rm_trainer.per_member(optim.make_optimizer(optim_config, 10))
  step = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), grad_accum_steps=accum)
  init = lambda key: state_lib.create(rm.init(key), opt, key)
  abstract = jax.eval_shape(init, jax.random.key(0))
  pairs, tokens = BATCH[size]
  t0 = time.perf_counter()
  compiled = step.lower(abstract, abstract_batch(pairs, tokens)).compile()
  row = {'size': size, 'option': option, 'pairs': pairs, 'tokens': tokens,
         'compile_s': time.perf_counter() - t0,
         'param_bytes': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))}
  mem = compiled.memory_analysis()
  row.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
             temp_bytes=int(mem.temp_size_in_bytes))
  if run:
    state = jax.jit(init)(jax.random.key(0))
    batch = real_batch(pairs, tokens, rm.config.vocab_size)
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    row['step_s'] = float(np.median(times))
  return row


def table(rows: list[dict]) -> str:
  mib = lambda b: f'{b / 2**20:,.1f}'
  lines = ['| size | option | params MiB | arguments MiB | temp MiB | temp vs plain | compile s | step s |',
           '|---|---|---|---|---|---|---|---|']
  plain = {r['size']: r['temp_bytes'] for r in rows if r['option'] == 'plain'}
  for r in rows:
    ratio = r['temp_bytes'] / plain[r['size']] if plain.get(r['size']) else float('nan')
    step = f'{r["step_s"]:.3f}' if 'step_s' in r else '–'
    lines.append(f'| {r["size"]} | {r["option"]} | {mib(r["param_bytes"])} | {mib(r["argument_bytes"])} | '
                 f'{mib(r["temp_bytes"])} | {ratio:.2f}× | {r["compile_s"]:.1f} | {step} |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='tiny,small', help='comma-separated model sizes')
  parser.add_argument('--options', default=','.join(OPTIONS), help=f'comma-separated, from {list(OPTIONS)}')
  parser.add_argument('--time', action='store_true', help='also run each step and report its median time')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=str(RESULTS))
  args = parser.parse_args(argv)
  sizes, options = args.sizes.split(','), args.options.split(',')
  unknown = [o for o in options if o not in OPTIONS] + [s for s in sizes if s not in BATCH]
  if unknown:
    parser.error(f'unknown sizes or options {unknown}; sizes: {sorted(BATCH)}, options: {list(OPTIONS)}.')
  rows = []
  for size in sizes:
    for option in options:
      rows.append(measure(size, option, run=args.time, repeats=args.repeats))
      print(f'{size} {option}: temp {rows[-1]["temp_bytes"] / 2**20:.1f} MiB', flush=True)
  print(table(rows))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = out / f'memory-{stamp}.json'
  path.write_text(json.dumps({'backend': jax.default_backend(), 'devices': str(jax.devices()),
                              'loadavg': os.getloadavg(), 'rows': rows}, indent=2))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
