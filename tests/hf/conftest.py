"""Shared fixtures: a BPE tokenizer trained here, saved as Hugging Face tokenizer folders."""
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope='session')
def tokenizer_folders(tmp_path_factory):
  """Two folders with one trained BPE tokenizer: the template in chat_template.jinja / in tokenizer_config.json."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ['hello there, how are you?', 'hi, be brief.', 'the assistant is helpful'] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  new, old = tmp_path_factory.mktemp('new'), tmp_path_factory.mktemp('old')
  for folder in (new, old):
    (folder / 'tokenizer.json').write_text(tok.to_str())
  specials = {'pad_token': '<pad>', 'bos_token': {'__type': 'AddedToken', 'content': '<s>', 'special': True},
              'eos_token': '<|im_end|>'}
  (new / 'tokenizer_config.json').write_text(json.dumps(specials))
  (new / 'chat_template.jinja').write_text(CHATML)
  (old / 'tokenizer_config.json').write_text(json.dumps(specials | {'chat_template': [
      {'name': 'default', 'template': CHATML}, {'name': 'tool_use', 'template': 'unused'}]}))
  return new, old
