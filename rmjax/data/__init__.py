"""rmjax.data: tokenizers, the synthetic language, TFDS builders and grain batching."""
from rmjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_from_dict

__all__ = ['ByteTokenizer', 'HFTokenizer', 'Tokenizer', 'tokenizer_from_dict']
