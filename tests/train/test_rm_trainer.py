"""The reward-model step: K members in one program, per-member independence, bootstrap weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax import config as C
from rmjax import objectives, parallel
from rmjax.models import ensemble
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import RewardModel
from rmjax.train import optim, rm_trainer
from rmjax.train import state as state_lib

CFG = ModelConfig(vocab_size=32, width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1, max_len=16)
B, T = 8, 12


def _batch(seed=0, b=B):
  rng = np.random.default_rng(seed)
  lens_c, lens_r = rng.integers(4, T + 1, b), rng.integers(4, T + 1, b)
  mask_c, mask_r = np.arange(T)[None] < lens_c[:, None], np.arange(T)[None] < lens_r[:, None]
  return dict(chosen_tokens=np.where(mask_c, rng.integers(3, 32, (b, T)), 0).astype(np.int32),
              rejected_tokens=np.where(mask_r, rng.integers(3, 32, (b, T)), 0).astype(np.int32),
              chosen_mask=mask_c, rejected_mask=mask_r, weight=np.ones(b, np.float32),
              index=np.arange(b, dtype=np.int64) + 100 * seed)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _train(rm, params, steps, *, bootstrap=False, per_member=True, grad_clip=1.0, eps=1e-8):
  opt_config = C.optim(lr=1e-2, warmup_steps=0, grad_clip=grad_clip)
  opt_config.eps = eps
  opt = optim.make_optimizer(opt_config, 10)
  if per_member:
    opt = rm_trainer.per_member(opt)
  state = state_lib.create(_copy(params), opt, jax.random.key(3))  # the step donates its state
  step = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), bootstrap=bootstrap)
  mesh = parallel.make_mesh()
  history = []
  for s in range(steps):
    state, m = step(state, parallel.global_batch(_batch(s), mesh))
    history.append(jax.device_get(m))
  return state, history


@pytest.fixture(scope='module')
def full2():
  rm = RewardModel(CFG, num_members=2, kind='full')
  return rm, rm.init(jax.random.key(0))


def test_joint_training_equals_separate_runs(full2):
  # Gradient clipping is per member, so member 0's trajectory does not see member 1 (tol 1e-5, fp32).
  # Adam's eps at 1e-4: at 1e-8, g/(|g| + eps) turns float rounding in near-zero gradients (the
  # head's bias, to which Bradley-Terry is invariant, and a few others; the joint and the single
  # program sum in other orders) into lr-sized steps, which says nothing about independence.
  rm, params = full2
  joint, _ = _train(rm, params, 3, eps=1e-4)
  alone_rm = RewardModel(CFG, num_members=1, kind='full')
  alone, _ = _train(alone_rm, ensemble.stack([ensemble.member(params, 0)]), 3, eps=1e-4)
  joint0, alone0 = ensemble.member(joint.params, 0), ensemble.member(alone.params, 0)
  for a, b in zip(jax.tree.leaves(joint0), jax.tree.leaves(alone0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_loss_decreases_and_metrics_named(full2):
  rm, params = full2
  batch = _batch(0)
  mesh = parallel.make_mesh()
  opt = rm_trainer.per_member(optim.make_optimizer(C.optim(lr=3e-2, warmup_steps=0), 30))
  state = state_lib.create(_copy(params), opt, jax.random.key(1))
  step = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'))
  losses = []
  for _ in range(15):  # one fixed batch: the loss must fall well below log 2
    state, m = step(state, parallel.global_batch(batch, mesh))
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0]
  assert {'loss', 'accuracy', 'grad_norm', 'update_norm', 'loss_0', 'loss_1', 'accuracy_0'} <= set(m)
  assert float(m['accuracy']) == 1.0


def test_first_loss_is_bradley_terry_by_hand(full2):
  rm, params = full2
  batch = _batch(0)  # the batch of step 0 in _train
  rc, rr = rm_trainer.pair_scores(rm, params, jax.tree.map(jnp.asarray, batch))
  expected = np.mean(np.log1p(np.exp(-(np.asarray(rc) - np.asarray(rr)))), axis=1).mean()  # -log sigmoid
  _, hist = _train(rm, params, 1)
  assert hist[0]['loss'] == pytest.approx(expected, rel=1e-5)


def test_padding_rows_do_not_count(full2):
  rm, params = full2
  batch = _batch(1)
  padded = {k: np.concatenate([v, v[:3]]) for k, v in batch.items()}
  padded['weight'][-3:] = 0.0
  padded['chosen_tokens'][-3:] = 7  # garbage in the padding rows
  loss_fn = objectives.get('bradley_terry')
  opt = rm_trainer.per_member(optim.make_optimizer(C.optim(), 10))
  step = rm_trainer.make_train_step(rm, opt, loss_fn)
  mesh = parallel.make_mesh()
  _, m1 = step(state_lib.create(_copy(params), opt, jax.random.key(0)), parallel.global_batch(batch, mesh))
  _, m2 = step(state_lib.create(_copy(params), opt, jax.random.key(0)), parallel.global_batch(padded, mesh))
  assert float(m1['loss']) == pytest.approx(float(m2['loss']), rel=1e-6)


def test_bootstrap_weights_depend_only_on_example_and_member():
  key = jax.random.key(7)
  idx = jnp.arange(2000)
  w = np.asarray(rm_trainer.bootstrap_weights(key, idx, 3))
  assert w.shape == (3, 2000)
  # The same example gets the same weight in any batch composition.
  w_sub = np.asarray(rm_trainer.bootstrap_weights(key, idx[::-1][:50], 3))
  np.testing.assert_array_equal(w_sub, w[:, ::-1][:, :50])
  # Poisson(1): mean 1 and P(w=0) = e^-1 ≈ 0.368; 6 sigma bounds over 2000 draws.
  assert abs(w.mean() - 1.0) < 6 * np.sqrt(1 / 6000)
  assert abs((w == 0).mean() - np.exp(-1)) < 6 * np.sqrt(0.368 * 0.632 / 6000)
  assert not np.array_equal(w[0], w[1])  # members resample differently


def test_normalized_eval_metrics_hand_case():
  # Member 1 lives on a 10x scale around 100. Its raw differences would dominate a plain mean;
  # normalized by its reference std (10x member 0's), both members count equally.
  rc = np.stack([[1.0, -1.0, 0.5], 100 + 10 * np.array([0.0, 0.5, 1.0])])
  rr = np.stack([[0.0, 0.0, 1.0], 100 + 10 * np.array([0.5, 0.0, 0.0])])
  # differences: member 0 [1, -1, -0.5]; member 1 10 * [-0.5, 0.5, 1]
  scores = {'r_chosen': rc, 'r_rejected': rr,
            'gold_chosen': np.array([1.0, 0.0, 1.0]), 'gold_rejected': np.array([0.0, 1.0, 0.0])}
  ref = np.stack([[0.0, 1.0, -1.0], [100.0, 110.0, 90.0]])
  stats = rm_trainer.normalization_stats(ref)
  np.testing.assert_allclose(stats.mean, [0.0, 100.0])
  np.testing.assert_allclose(stats.std, [np.sqrt(2 / 3), 10 * np.sqrt(2 / 3)])
  loss = objectives.get('bradley_terry')
  m = rm_trainer.pair_metrics(scores, loss, stats=stats)
  # normalized mean difference ∝ [1 - 0.5, -1 + 0.5, -0.5 + 1] = [+, -, +]: gold signs [+, -, +].
  assert m['eval/accuracy'] == pytest.approx(2 / 3) and m['eval/gold_accuracy'] == 1.0
  assert m['eval/accuracy_0'] == pytest.approx(1 / 3) and m['eval/accuracy_1'] == pytest.approx(2 / 3)
  assert m['eval/gold_accuracy_0'] == pytest.approx(2 / 3) and m['eval/gold_accuracy_1'] == pytest.approx(1 / 3)
  raw = rm_trainer.pair_metrics(scores, loss, stats=None)  # member 1 dominates: signs [-, +, +]
  assert raw['eval/gold_accuracy'] == pytest.approx(1 / 3)
  # eval/loss: mean over members and pairs of -log sigmoid(r_c - r_r) on raw scores.
  d = rc - rr
  assert m['eval/loss'] == pytest.approx(np.mean(np.log1p(np.exp(-d))), rel=1e-6)
