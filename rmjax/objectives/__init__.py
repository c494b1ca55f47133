"""rmjax.objectives: the objective algebra, every piece reachable by name.

    loss = rmjax.objectives.get('bradley_terry', margin=0.5)
    per_example = loss(r_chosen, r_rejected)                     # [B]
    scalar = rmjax.objectives.reduce(per_example, mask, 'token_mean')

`python -m rmjax.objectives` lists every registered piece; `docs/objectives.md` shows how to
add one.
"""
from rmjax.objectives import advantages
from rmjax.objectives import aggregations
from rmjax.objectives import policy_losses
from rmjax.objectives import preference_losses
from rmjax.objectives import reward_transforms
from rmjax.objectives import rm_losses
from rmjax.objectives.advantages import Advantage
from rmjax.objectives.advantages import ReinforceState
from rmjax.objectives.advantages import returns_to_go
from rmjax.objectives.aggregations import normalize
from rmjax.objectives.base import EmptyState
from rmjax.objectives.base import RewardContext
from rmjax.objectives.base import RewardStats
from rmjax.objectives.base import Transform
from rmjax.objectives.base import chain
from rmjax.objectives.base import stateless
from rmjax.objectives.compose import Objective
from rmjax.objectives.compose import build
from rmjax.objectives.compose import transform
from rmjax.objectives.policy_losses import PolicyBatch
from rmjax.objectives.policy_losses import sum_losses
from rmjax.objectives.reduction import MODES
from rmjax.objectives.reduction import batch_normalizer
from rmjax.objectives.reduction import reduce
from rmjax.objectives.registry import KINDS
from rmjax.objectives.registry import entries
from rmjax.objectives.registry import entry
from rmjax.objectives.registry import get
from rmjax.objectives.registry import options
from rmjax.objectives.registry import register
from rmjax.objectives.reward_transforms import AdaptiveKLState
from rmjax.objectives.reward_transforms import LagrangianState
from rmjax.objectives.reward_transforms import WhitenState

__all__ = [
    'AdaptiveKLState', 'Advantage', 'EmptyState', 'KINDS', 'LagrangianState', 'MODES', 'Objective',
    'PolicyBatch', 'ReinforceState', 'RewardContext', 'RewardStats', 'Transform', 'WhitenState',
    'advantages', 'aggregations', 'batch_normalizer', 'build', 'chain', 'entries', 'entry', 'get',
    'normalize', 'options', 'policy_losses', 'preference_losses', 'reduce', 'register',
    'returns_to_go', 'reward_transforms', 'rm_losses', 'stateless', 'sum_losses', 'transform',
]
