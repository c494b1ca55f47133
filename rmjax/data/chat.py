"""Hugging Face tokenizer folders: `tokenizer.json`, special tokens and chat templates (Jinja).

A folder as `transformers` writes it holds `tokenizer.json` (read by the `tokenizers`
library), `tokenizer_config.json` (special tokens such as `"eos_token": "<|im_end|>"` or
`{"content": ...}`, and in older folders `"chat_template"`), and in current folders
`chat_template.jinja`. `load_tokenizer` reads all three; the chat template is rendered
the way `transformers.apply_chat_template` renders it (a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the special tokens as variables, `raise_exception` and
`tojson`), so prompts are formatted as the model was trained.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import tokenizers
from jinja2 import sandbox

from rmjax.data.tokenizer import HFTokenizer

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'
ROLES = ('system', 'user', 'assistant', 'tool')
Message = Mapping[str, Any]


def _raise(message: str) -> None:
  raise ValueError(f'chat template: {message}')


def _tojson(value: Any, indent: int | None = None) -> str:
  return json.dumps(value, ensure_ascii=False, indent=indent)


def check_messages(messages: Sequence[Message], where: str = 'messages') -> None:
  """Each message is a dict with a `role` in ROLES and a string `content`."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f'{where}: expected a non-empty list of {{"role", "content"}} messages.')
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
      raise ValueError(f'{where}[{i}]: expected {{"role": one of {ROLES}, "content": str}}, got {m!r:.120}.')


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Jinja chat template and the special-token strings it may refer to (`bos_token`, ...)."""
  source: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def _compiled(self) -> jinja2.Template:
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters['tojson'] = _tojson
    env.globals['raise_exception'] = _raise
    try:
      return env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'chat template: Jinja syntax error at line {e.lineno}: {e.message}') from e

  def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False, **variables: Any) -> str:
    """The conversation as text; `add_generation_prompt` appends the assistant turn's opening."""
    check_messages(messages)
    context = {**self.special_tokens, **variables}
    return self._compiled.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt, **context)

  def split(self, messages: Sequence[Message]) -> tuple[str, str]:
    """(prompt, response) for a conversation ending in an assistant turn: the prompt is the
    earlier turns with the generation prompt, the response the rest of the full rendering."""
    check_messages(messages)
    if messages[-1]['role'] != 'assistant':
      raise ValueError(f'ChatTemplate.split: the last message must be the assistant\'s, got {messages[-1]["role"]!r}.')
    prompt = self.render(messages[:-1], add_generation_prompt=True)
    full = self.render(messages)
    if not full.startswith(prompt):
      raise ValueError('ChatTemplate.split: the template renders the conversation without the prompt as its '
                       'prefix, so prompt and response cannot be separated.')
    return prompt, full[len(prompt):]


def _token_text(value: Any) -> str | None:
  if isinstance(value, Mapping):
    return value.get('content')
  return value if isinstance(value, str) else None


def load_tokenizer(folder: str | pathlib.Path, **specials: Any) -> tuple[HFTokenizer, ChatTemplate | None]:
  """(tokenizer, chat template or None) of a Hugging Face tokenizer folder.

  Special tokens come from `specials` (as `HFTokenizer` takes them), else from
  `tokenizer_config.json`'s `pad_token` / `bos_token` / `eos_token`, else the conventional
  spellings. The template is `chat_template.jinja` if present, else `tokenizer_config.json`'s
  `chat_template` (a string, or a list of `{"name", "template"}` whose "default" is used).
  """
  folder = pathlib.Path(folder)
  if not (folder / TOKENIZER_FILE).is_file():
    raise ValueError(f'{folder}: no {TOKENIZER_FILE}; only fast (tokenizers-library) tokenizers are read.')
  cfg_path = folder / TOKENIZER_CONFIG_FILE
  cfg = json.loads(cfg_path.read_text(encoding='utf-8')) if cfg_path.is_file() else {}
  text = (folder / TOKENIZER_FILE).read_text(encoding='utf-8')
  vocab = tokenizers.Tokenizer.from_str(text)
  tokens = {}
  for name in ('pad_token', 'bos_token', 'eos_token', 'unk_token'):
    token = _token_text(cfg.get(name))
    if token is not None:
      tokens[name] = token
      kind = name[:-len('_token')]
      if kind != 'unk' and f'{kind}_id' not in specials and vocab.token_to_id(token) is not None:
        specials.setdefault(name, token)
  tokenizer = HFTokenizer(text, **specials)
  source = None
  if (folder / CHAT_TEMPLATE_FILE).is_file():
    source = (folder / CHAT_TEMPLATE_FILE).read_text(encoding='utf-8')
  elif isinstance(cfg.get('chat_template'), str):
    source = cfg['chat_template']
  elif isinstance(cfg.get('chat_template'), list):
    named = {t.get('name'): t.get('template') for t in cfg['chat_template']}
    if 'default' not in named:
      raise ValueError(f'{cfg_path}: chat_template is a list without a "default" entry (names: {sorted(named)}).')
    source = named['default']
  return tokenizer, None if source is None else ChatTemplate(source, tokens)


def save_tokenizer(tokenizer: HFTokenizer, folder: str | pathlib.Path, *,
                   chat_template: ChatTemplate | None = None) -> None:
  """Writes `tokenizer.json`, a `tokenizer_config.json` naming its pad / bos / eos tokens, and
  `chat_template.jinja` when a template is given; `transformers.AutoTokenizer` reads the folder."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  d = tokenizer.to_dict()
  (folder / TOKENIZER_FILE).write_text(d['json'], encoding='utf-8')
  vocab = tokenizers.Tokenizer.from_str(d['json'])
  cfg: dict[str, Any] = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  for kind in ('pad', 'bos', 'eos'):
    cfg[f'{kind}_token'] = vocab.id_to_token(d[f'{kind}_id'])
  (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding='utf-8')
  if chat_template is not None:
    (folder / CHAT_TEMPLATE_FILE).write_text(chat_template.source, encoding='utf-8')
