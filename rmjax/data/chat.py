"""Hugging Face tokenizer folders: `tokenizer.json`, special tokens and chat templates."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import tokenizers

from rmjax.data.tokenizer import HFTokenizer

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'


def save_tokenizer(tokenizer: HFTokenizer, folder: str | pathlib.Path, *, chat_template: str | None = None) -> None:
  """Writes `tokenizer.json` and a `tokenizer_config.json` naming its pad / bos / eos tokens
  (and the chat template, if given), which `transformers.AutoTokenizer` reads."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  d = tokenizer.to_dict()
  (folder / TOKENIZER_FILE).write_text(d['json'], encoding='utf-8')
  tok = tokenizers.Tokenizer.from_str(d['json'])
  cfg: dict[str, Any] = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  for kind in ('pad', 'bos', 'eos'):
    cfg[f'{kind}_token'] = tok.id_to_token(d[f'{kind}_id'])
  if chat_template is not None:
    cfg['chat_template'] = chat_template
  (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding='utf-8')
