"""rmjax.data: tokenizers, the synthetic language, TFDS builders and grain batching."""
from rmjax.data.builders import (JsonlPreferences, JsonlPreferencesConfig, SyntheticPreferences,
                                 SyntheticPreferencesConfig, TextCorpus, TextCorpusConfig, data_key,
                                 label_pair, preference_features)
from rmjax.data.pipeline import (PairBatches, SequenceBatches, encode_document, encode_prompt_response,
                                 epoch_seed)
from rmjax.data.synthetic_language import Grammar, GrammarOptions
from rmjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_from_dict

__all__ = [
    'ByteTokenizer', 'Grammar', 'GrammarOptions', 'HFTokenizer', 'JsonlPreferences', 'JsonlPreferencesConfig',
    'PairBatches', 'SequenceBatches', 'SyntheticPreferences', 'SyntheticPreferencesConfig', 'TextCorpus',
    'TextCorpusConfig', 'Tokenizer', 'data_key', 'encode_document', 'encode_prompt_response', 'epoch_seed',
    'label_pair', 'preference_features', 'tokenizer_from_dict',
]
