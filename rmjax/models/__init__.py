"""rmjax.models: decoder-only transformers (Llama, GPT-2), heads, reward models, ensembles, sampling.

Parameters are plain nested dicts without flax's top-level 'params' collection; see
`transformer` for the layout and `docs/models.md` for an overview.
"""
from rmjax.models import ensemble
from rmjax.models.config import SIZES, ModelConfig, get_size
from rmjax.models.heads import LMHead, RewardHead, ValueHead
from rmjax.models.partitioning import logical_axes
from rmjax.models.reward_model import RewardModel, last_index
from rmjax.models.sampling import SampleOutput, sample, token_logprobs
from rmjax.models.transformer import (KVCache, LanguageModel, Transformer, default_positions, grow_cache, init_cache,
                                      init_lm, lm_decode, lm_logits)
from rmjax.models.value_model import init_value_model, values
