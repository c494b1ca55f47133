"""rmjax.objectives: the objective algebra, every piece reachable by name.

    loss = rmjax.objectives.get('bradley_terry', margin=0.5)
    per_example = loss(r_chosen, r_rejected)                     # [B]
    scalar = rmjax.objectives.reduce(per_example, mask, 'token_mean')

`python -m rmjax.objectives` lists every registered piece.
"""
from rmjax.objectives import aggregations
from rmjax.objectives import rm_losses
from rmjax.objectives.aggregations import normalize
from rmjax.objectives.base import EmptyState
from rmjax.objectives.base import RewardContext
from rmjax.objectives.base import RewardStats
from rmjax.objectives.base import Transform
from rmjax.objectives.base import chain
from rmjax.objectives.base import stateless
from rmjax.objectives.reduction import MODES
from rmjax.objectives.reduction import batch_normalizer
from rmjax.objectives.reduction import reduce
from rmjax.objectives.registry import KINDS
from rmjax.objectives.registry import entries
from rmjax.objectives.registry import entry
from rmjax.objectives.registry import get
from rmjax.objectives.registry import options
from rmjax.objectives.registry import register

__all__ = [
    'EmptyState', 'KINDS', 'MODES', 'RewardContext', 'RewardStats', 'Transform', 'aggregations',
    'batch_normalizer', 'chain', 'entries', 'entry', 'get', 'normalize', 'options', 'reduce',
    'register', 'rm_losses', 'stateless',
]
