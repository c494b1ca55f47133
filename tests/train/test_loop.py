"""The outer loop: exact resume after a fault, preemption signals, non-finite loss, metrics."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from rmjax import config as C
from rmjax import parallel
from rmjax.models import transformer
from rmjax.models.config import ModelConfig
from rmjax.train import checkpoint, lm_trainer, loop, optim
from rmjax.train import state as state_lib

CFG = ModelConfig(vocab_size=32, width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1, max_len=16)
STEPS = 8


class Batches:
  """Batch s is a pure function of s."""

  def __getitem__(self, s):
    rng = np.random.default_rng(s)
    tokens = rng.integers(3, 32, (4, 10)).astype(np.int32)
    return dict(tokens=tokens, mask=np.ones((4, 10), bool), loss_mask=np.ones((4, 10), bool),
                weight=np.ones(4, np.float32), index=np.arange(4))


@pytest.fixture(scope='module')
def setup():
  opt = optim.make_optimizer(C.optim(lr=1e-2, warmup_steps=2), STEPS)
  mesh = parallel.make_mesh()
  init = lambda: state_lib.create(transformer.init_lm(jax.random.key(0), CFG), opt, jax.random.key(1))
  abstract = jax.eval_shape(init)
  shardings = state_lib.state_shardings(abstract, opt, mesh)
  step = lm_trainer.make_train_step(CFG, opt, state_shardings=shardings)
  return dict(step=step, init=jax.jit(init, out_shardings=shardings), mesh=mesh,
              abstract=state_lib.with_shardings(abstract, shardings))


def _run(setup, workdir, train_step=None, **loop_kw):
  cfg = loop.LoopConfig(steps=STEPS, log_every=1, checkpoint_every=2, progress=False, **loop_kw)
  return loop.run(workdir=workdir, loop=cfg, train_step=train_step or setup['step'], init_state=setup['init'],
                  abstract_state=setup['abstract'], batches=Batches(), mesh=setup['mesh'],
                  metadata=lambda s: {'note': 'test'})


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope='module')
def uninterrupted(setup, tmp_path_factory):
  state, meta = _run(setup, tmp_path_factory.mktemp('full'))
  return _leaves(state), meta


def test_injected_failure_then_resume_is_bitwise_equal(setup, uninterrupted, tmp_path):
  with pytest.raises(loop.InjectedFailure):
    _run(setup, tmp_path, fail_at_step=5)
  assert checkpoint.Checkpointer(tmp_path / 'checkpoints').latest_step() == 4
  state, meta = _run(setup, tmp_path)
  for a, b in zip(_leaves(state), uninterrupted[0]):
    np.testing.assert_array_equal(a, b)
  assert meta['final'] and meta['data_step'] == STEPS
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))  # each step logged once across the two runs


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR2])
def test_preemption_signal_checkpoints_and_exits_then_resumes(setup, uninterrupted, tmp_path, signum):
  def step_then_signal(state, batch):
    out = setup['step'](state, batch)
    if int(out[0].step) == 3:
      os.kill(os.getpid(), signum)
    return out

  with pytest.raises(loop.Preempted):
    _run(setup, tmp_path, train_step=step_then_signal)
  assert checkpoint.Checkpointer(tmp_path / 'checkpoints').latest_step() == 3  # written at the signal
  state, _ = _run(setup, tmp_path)
  for a, b in zip(_leaves(state), uninterrupted[0]):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
  def poisoned(state, batch):
    new, m = setup['step'](state, batch)
    if int(new.step) >= 5:
      new = new._replace(params=jax.tree.map(lambda x: x * np.nan, new.params))
      m = dict(m, loss=m['loss'] * np.nan)
    return new, m

  with pytest.raises(loop.NonFiniteLossError, match='non-finite at or before step 5.*last good checkpoint is step 4'):
    _run(setup, tmp_path, train_step=poisoned)
  state, meta = checkpoint.load(tmp_path / 'checkpoints')
  assert meta['data_step'] == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_finished_run_is_not_redone(setup, uninterrupted, tmp_path):
  _run(setup, tmp_path)
  calls = []
  state, meta = _run(setup, tmp_path, train_step=lambda s, b: calls.append(1))
  assert not calls and meta['final']
