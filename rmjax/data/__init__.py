"""rmjax.data: tokenizers, the synthetic language, TFDS builders and grain batching."""
from rmjax.data.synthetic_language import Grammar, GrammarOptions
from rmjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_from_dict

__all__ = ['ByteTokenizer', 'Grammar', 'GrammarOptions', 'HFTokenizer', 'Tokenizer', 'tokenizer_from_dict']
