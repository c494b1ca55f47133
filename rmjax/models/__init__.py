"""rmjax.models: decoder-only transformers (Llama, GPT-2), reward models, ensembles.

Parameters are plain nested dicts without flax's top-level 'params' collection; see
`transformer` for the layout and `docs/models.md` for an overview.
"""
from rmjax.models import ensemble
from rmjax.models.config import SIZES, ModelConfig, get_size
from rmjax.models.reward_model import RewardModel, last_index
from rmjax.models.transformer import KVCache, default_positions, init_cache, init_lm, lm_decode, lm_logits
