"""The outer training loop shared by every trainer: resume, step, log, evaluate, checkpoint.

Resume order: the workdir's own latest checkpoint, else a given `init_state` (for example
weights from another run), else a fresh state. Batch `s` is a pure function of `s`
(`batches[s]`), and the step's randomness is `fold_in(rng, step)`, so a killed run resumes to
bitwise the same result on CPU. SIGTERM and SIGUSR2 (a cluster's preemption / pre-timeout
signals) write a checkpoint at the next step boundary and exit; with several processes, at a step
they all agree on (`_Preemption`). A non-finite loss stops the
run with `NonFiniteLossError` before any checkpoint of the bad state is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from jax.experimental import multihost_utils

from rmjax import config as config_lib
from rmjax import parallel
from rmjax.train import checkpoint
from rmjax.train.checkpoint import Checkpointer
from rmjax.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class InjectedFailure(RuntimeError):
  """Raised by `LoopConfig.fail_at_step`: a deterministic fault for resume tests."""


class Preempted(SystemExit):
  """SIGTERM / SIGUSR2 arrived; a checkpoint was written."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """steps: total updates. log_every / eval_every / checkpoint_every: in steps (0 = never, except the end).
  keep: checkpoints kept. fail_at_step: raise `InjectedFailure` before running that step (-1: off).
  progress: show a tqdm bar. desc: the bar's label. save_initial: a fresh run first evaluates and
  checkpoints its initial state as step 0 (so a curve over checkpoints starts at the start).
  extra_steps: steps at which to log, evaluate and checkpoint as well (e.g. early steps, where a
  curve over checkpoints changes fastest).
  """
  steps: int
  log_every: int = 50
  eval_every: int = 0
  checkpoint_every: int = 100
  keep: int = 3
  fail_at_step: int = -1
  progress: bool = True
  desc: str = 'train'
  save_initial: bool = False
  extra_steps: tuple[int, ...] = ()

  @classmethod
  def from_config(cls, train_config, desc: str = 'train') -> 'LoopConfig':
    c = train_config
    return cls(steps=int(c.steps), log_every=int(c.log_every), eval_every=int(c.eval_every),
               checkpoint_every=int(c.checkpoint_every), keep=int(c.keep), fail_at_step=int(c.fail_at_step),
               progress=bool(c.progress), desc=desc, save_initial=bool(c.save_initial),
               extra_steps=tuple(int(s) for s in c.get('extra_steps', ())))


class _Preemption:
  """Whether a preemption notice asks the loop to save and stop at a step.

  One process: SIGTERM / SIGUSR2 set a flag and the loop saves at the next step boundary. Several
  `jax.distributed` processes must save at the same step (a checkpoint is written by all of them
  together), and a signal reaches each at a different step. So there the notice goes through
  jax's preemption sync service (orbax's preemption support rests on it): its own SIGTERM
  handler tells the coordination service, SIGUSR2 is forwarded to this process as SIGTERM, and
  `reached_preemption_sync_point(step)` becomes true at the same step on every process — one past
  the largest step any of them had reached when the notice spread. Every process calls `due` at
  every step, as that service requires.
  """

  def __init__(self):
    self.signum: int | None = None
    self.multi_process = jax.process_count() > 1

  def due(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def describe(self) -> str:
    return f'signal {self.signum}' if self.signum is not None else 'a preemption notice to a process of this job'

  @contextlib.contextmanager
  def handlers(self):
    """Installs the handlers while the loop runs (the main thread only); restores the old ones after."""
    def record(signum, _frame):
      self.signum = signum

    def forward(signum, _frame):
      self.signum = signum
      os.kill(os.getpid(), signal.SIGTERM)

    # With several processes SIGTERM stays with jax's handler: replacing it would hide the notice.
    wanted = {signal.SIGUSR2: forward} if self.multi_process else {signal.SIGTERM: record, signal.SIGUSR2: record}
    old = {}
    for sig, handler in wanted.items():
      try:
        old[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    try:
      yield self
    finally:
      for sig, h in old.items():
        signal.signal(sig, h)


def describe(run_config, **fields: Any) -> dict[str, Any]:
  """Checkpoint metadata of a run: `fields` (model, tokenizer, kind, ...) plus the run's config,
  its hash and the code version, so that a checkpoint loads with no other file."""
  config_json = config_lib.to_json(run_config)
  return dict(fields, config=json.loads(config_json), config_hash=checkpoint.config_hash(config_json),
              code=checkpoint.code_version())


def _is_due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def run(*, workdir: str | pathlib.Path, loop: LoopConfig, train_step: Callable, init_state: Callable[[], Any],
        abstract_state: Any, batches, mesh, metadata: Callable[[Any], Mapping[str, Any]],
        evaluate: Callable[[Any], Mapping[str, float]] | None = None,
        finalize: Callable[[Any], Mapping[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
  """Train to `loop.steps` and return `(state, final metadata)`.

  train_step(state, batch) -> (state, metrics dict of scalars, incl. 'loss'); jitted by the caller.
  init_state() -> a state placed on the mesh (called only when there is no checkpoint).
  abstract_state: ShapeDtypeStructs with shardings, for restore.
  batches: `batches[s]` -> this process's numpy batch number s.
  metadata(state) -> JSON-able dict stored with every checkpoint.
  evaluate(state) -> scalars logged under their own names (e.g. 'eval/accuracy').
  finalize(state) -> extra metadata for the last checkpoint (e.g. reward normalization).
  """
  workdir = pathlib.Path(workdir)
  ckpt = Checkpointer(workdir / 'checkpoints', max_to_keep=loop.keep)
  restored = ckpt.restore(abstract_state)
  if restored is not None:
    state, meta, start = restored
    log.info('resumed from %s at step %d', workdir / 'checkpoints', start)
    if start >= loop.steps:
      ckpt.close()
      return state, meta
  else:
    state, start = init_state(), 0
  writer = MetricsWriter(workdir, resume_step=start if restored is not None else None)
  bar = tqdm.tqdm(total=loop.steps, initial=start, desc=loop.desc, disable=not loop.progress,
                  dynamic_ncols=True, leave=True)
  finite = jnp.ones((), bool)
  last_saved, t0, t0_step = start, time.perf_counter(), start
  try:
    if restored is None and loop.save_initial:
      if evaluate is not None:
        writer.write(0, dict(evaluate(state)))
      ckpt.save(0, state, dict(metadata(state), final=False, data_step=0))
    with _Preemption().handlers() as preemption:
      for step in range(start, loop.steps):
        if step == loop.fail_at_step:
          raise InjectedFailure(f'injected failure before step {step} (fail_at_step={loop.fail_at_step}).')
        state, metrics = train_step(state, parallel.global_batch(batches[step], mesh))
        finite = finite & jnp.isfinite(metrics['loss'])
        done = step + 1
        extra = done in loop.extra_steps
        to_log = extra or _is_due(done, loop.log_every, loop.steps)
        preempted = preemption.due(done)
        to_save = extra or preempted or _is_due(done, loop.checkpoint_every, loop.steps)
        if to_log or to_save:
          if not bool(finite):
            raise NonFiniteLossError(
                f'the training loss became non-finite at or before step {done} (checked every '
                f'{loop.log_every} steps); the last good checkpoint is step {last_saved} in '
                f'{workdir / "checkpoints"}. Lower the learning rate or check the data.')
        if to_log:
          scalars = {f'train/{k}': float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          scalars['train/steps_per_sec'] = (done - t0_step) / max(now - t0, 1e-9)
          t0, t0_step = now, done
          if evaluate is not None and (extra or _is_due(done, loop.eval_every, loop.steps)):
            scalars.update(evaluate(state))
          writer.write(done, scalars)
          bar.set_postfix(loss=f'{scalars["train/loss"]:.4f}', it_s=f'{scalars["train/steps_per_sec"]:.1f}')
        bar.update(1)
        if to_save:
          final = done == loop.steps
          meta = dict(metadata(state), final=final, data_step=done)
          if final and finalize is not None:
            meta.update(finalize(state))
          ckpt.save(done, state, meta)
          last_saved = done
          if preempted and not final:
            ckpt.wait()
            raise Preempted(f'{preemption.describe()}: checkpoint written at step {done}; rerun to resume.')
  finally:
    bar.close()
    writer.close()
    ckpt.wait()
    ckpt.close()
  return state, meta
