"""DPO and IPO against worked cases with unequal lengths (`../shared/PITFALLS.md` #8)."""
import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
from hypothesis import given

import rmjax.objectives as obj

# chosen: 2 tokens, log-ratios (0.5, 0.5); rejected: 1 valid token of 2, log-ratio −1
PAIR = dict(logp_chosen=jnp.array([[-1.0, -2.0]]), logp_rejected=jnp.array([[-3.0, -9.0]]),
            ref_logp_chosen=jnp.array([[-1.5, -2.5]]), ref_logp_rejected=jnp.array([[-2.0, -1.0]]),
            mask_chosen=jnp.array([[1.0, 1.0]]), mask_rejected=jnp.array([[1.0, 0.0]]))
SP1 = math.log1p(math.exp(-1.0))


def test_dpo_hand_values():
  # h = 1 − (−1) = 2, β·h = 1
  np.testing.assert_allclose(obj.get('dpo', beta=0.5)(**PAIR), [SP1], rtol=1e-6)
  np.testing.assert_allclose(obj.get('dpo', beta=0.5, label_smoothing=0.2)(**PAIR),
                             [0.8 * SP1 + 0.2 * (1.0 + SP1)], rtol=1e-6)


def test_ipo_on_sequence_and_averaged_log_ratios():
  # sequence form (Azar et al.): h = 2, (2 − 1/(2·0.5))² = 1
  np.testing.assert_allclose(obj.get('ipo', tau=0.5)(**PAIR), [1.0], rtol=1e-6)
  # averaged form (TRL): h = 0.5 − (−1) = 1.5, (1.5 − 1)² = 0.25
  np.testing.assert_allclose(obj.get('ipo', tau=0.5, average=True)(**PAIR), [0.25], rtol=1e-6)


def test_each_loss_type_gives_a_different_value():
  values = [float(obj.get(n, **kw)(**PAIR)[0]) for n, kw in
            [('dpo', {}), ('ipo', {}), ('ipo', dict(average=True))]]
  assert len({round(v, 6) for v in values}) == 3


@given(hnp.arrays(np.float32, (3, 4), elements=st.floats(-20, 0, width=32)),
       hnp.arrays(np.float32, (3, 2), elements=st.floats(-20, 0, width=32)), st.floats(0.01, 5.0))
def test_dpo_at_the_reference_policy_is_log_2(chosen, rejected, beta):
  out = obj.get('dpo', beta=beta)(chosen, rejected, chosen, rejected, np.ones((3, 4)), np.ones((3, 2)))
  np.testing.assert_allclose(out, math.log(2.0), rtol=1e-6)
