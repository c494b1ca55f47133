"""Building an objective from a config section, and the worked example of docs/objectives.md."""
import math
import pathlib
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import rmjax.objectives as obj

DOC = pathlib.Path(__file__).parents[2] / 'docs' / 'objectives.md'


def _config():
  c = ml_collections.ConfigDict()
  c.reward = 'uwo,log_sigmoid'
  c.uwo = dict(lam=0.5)
  c.log_sigmoid = dict(ref='given')
  c.advantage = 'rloo'
  c.rloo = dict(group_size=2)
  c.loss = ('pg', 'kl_k2')
  c.kl_k2 = dict(coef=0.05)
  c.reduction = 'token_mean'
  return c


def test_build_from_a_config_section():
  o = obj.build(_config())
  scores = jnp.array([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
  ctx = obj.RewardContext(ref_reward=jnp.array([5.0 / 3.0, 2.0 / 3.0]))
  reward, _ = o.apply_reward(scores, o.init_reward_state(), ctx)
  np.testing.assert_allclose(reward, [-math.log(2.0)] * 2, rtol=1e-6)  # uwo hits the reference
  adv = o.advantage(jnp.array([[0.0, 1.0], [0.0, 3.0]]), jnp.ones((2, 2)))
  np.testing.assert_allclose(adv.advantages, [[-2.0, -2.0], [2.0, 2.0]])
  batch = obj.PolicyBatch(logp=jnp.array([[-1.0, -2.0]]), mask=jnp.array([[1.0, 0.0]]),
                          advantages=jnp.array([[2.0, 2.0]]), ref_logp=jnp.array([[-2.0, -2.0]]))
  loss, metrics = o.loss(batch)
  np.testing.assert_allclose(o.reduce(loss, batch.mask), 2.0 + 0.05 * 0.5, rtol=1e-6)
  assert 'kl_k2' in metrics


def test_overriding_a_number_changes_the_built_piece():
  c = _config()
  c.uwo.lam = 0.0
  o = obj.build(c)
  scores = jnp.array([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
  ctx = obj.RewardContext(ref_reward=jnp.array([2.0, 2.0]))
  reward, _ = o.apply_reward(scores, o.init_reward_state(), ctx)
  np.testing.assert_allclose(reward, [-math.log(2.0)] * 2, rtol=1e-6)  # the plain mean, 2


@pytest.mark.parametrize('change, message', [
    (dict(rewards='uwo'), r"unknown field 'rewards'; valid fields: rm_loss, reward"),
    (dict(median={}), r"options are given for 'median', which no field selects"),
    (dict(loss='kl_k2,rloo'), r"'rloo' is of kind advantage and cannot go in 'loss'"),
    (dict(advantage='rloo,grpo'), 'advantage takes one name'),
    (dict(reduction='constant'), 'reduction_constant is required'),
    (dict(loss='pg,kl_k4'), r"unknown objective piece 'kl_k4'; known pieces: .*kl_k3"),
])
def test_build_errors_name_what_to_fix(change, message):
  c = _config().to_dict()
  c.update(change)
  with pytest.raises(ValueError, match=message):
    obj.build(c)


def test_unknown_piece_option_in_a_config():
  c = _config()
  c.kl_k2.coeff = 0.1
  with pytest.raises(ValueError, match=r"'kl_k2': unknown option\(s\) coeff; valid options: coef"):
    obj.build(c)


def test_the_docs_worked_example_runs(capsys):
  code = re.search(r'```python\n(.*?)```', DOC.read_text(), re.S).group(1)
  exec(compile(code, str(DOC), 'exec'), {'__name__': 'docs_objectives_example'})
  printed = capsys.readouterr().out
  np.testing.assert_allclose(np.fromstring(printed.strip()[1:-1], sep=' '),
                             [0.0, 2.0 * math.tanh(1.0), 2.0], rtol=1e-5)
  assert obj.entry('tanh_squash').kind == 'reward'
  t = obj.chain(obj.transform('mean'), obj.transform('tanh_squash', scale=1.0))
  out, _ = t.apply(jnp.array([[0.0, 40.0], [2.0, 40.0]]), t.init())
  np.testing.assert_allclose(out, [math.tanh(1.0), 1.0], rtol=1e-6)
