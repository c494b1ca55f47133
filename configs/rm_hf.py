"""Reward-model training from a local Hugging Face backbone on local preference files.

```
python -m rmjax.main --config=configs/rm_hf.py --config.model_path=MODEL \
  --config.data.train=TRAIN.jsonl --config.data.test=TEST.jsonl \
  [--config.bench.path=REWARDBENCH.jsonl] --workdir=DIR
```

MODEL: a Llama / Qwen2 / GPT-2 folder (`config.json`, safetensors weights and, unless
`tokenizer` names another folder, a `tokenizer.json` whose pad token differs from bos / eos).
TRAIN / TEST: preference files in `data.layout` ('hh_rlhf', 'ultrafeedback', 'helpsteer2' or
'generic' with `data.fields`; `rmjax.data.hf_datasets`). REWARDBENCH: rows with `prompt`,
`chosen`, `rejected`, `subset` (`configs/rm_eval.py`). Stages and outputs: `experiments/rm_hf.py`.
"""
import ml_collections

from rmjax import config as C


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f'configs/rm_hf.py takes no argument; got {arg!r}.')
  c = ml_collections.ConfigDict()
  c.job = 'experiments.rm_hf:run'
  c.seed = 0
  c.model_path = ''                    # Hugging Face model folder: its backbone starts every member
  c.dtype = 'float32'                  # or 'bfloat16': stored and compute dtype
  c.tokenizer = ''                     # tokenizer folder; '' = model_path
  c.data = ml_collections.ConfigDict(dict(
      train='', test='', layout='hh_rlhf',
      fields=ml_collections.ConfigDict(dict(prompt='prompt', chosen='chosen', rejected='rejected')),
      attribute='helpfulness',         # helpsteer2: the rating that orders a pair
      chat_template=False,             # True: message lists rendered by the tokenizer's template
      seq_len=512))
  # head_bias 'zero': the head bias stays exactly 0, so the export's transformers score is rmjax's.
  c.ensemble = ml_collections.ConfigDict(dict(kind='full', members=1, bootstrap=False, head_bias='zero'))
  c.loss = ml_collections.ConfigDict(dict(name='bradley_terry', margin=0.0, label_smoothing=0.0))
  c.optim = C.optim(lr=1e-5, warmup_steps=50, weight_decay=0.0)
  c.train = C.train(1000, batch_size=32, log_every=25, eval_every=250, checkpoint_every=250)
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, aggregate='mean'))
  # RewardBench-style evaluation of the export ('' skips it); seq_len and batch size are data's / eval's.
  c.bench = ml_collections.ConfigDict(dict(path='', chat_template=False, num_bins=10))
  c.mesh = C.mesh()
  return c
