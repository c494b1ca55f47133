"""RewardBench-style evaluation of a reward model or ensemble.

`python -m rmjax.main --config=configs/rm_eval.py --config.model.path=RM --config.data.path=PAIRS.jsonl
--workdir=DIR` writes DIR/results.json, DIR/results.md and DIR/reliability.png (see
`rmjax/eval/reward_bench.py` for the metrics). PAIRS is a RewardBench-format file (.jsonl,
.jsonl.gz, .json or .parquet) with string fields `prompt`, `chosen`, `rejected`, `subset`.

model.source: 'hf' (a sequence-classification folder, or a folder of `member_{k}` folders, as
`rmjax.models.hf.save` writes them) or 'checkpoint' (an rmjax reward-model checkpoint folder).
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f'configs/rm_eval.py takes no argument; got {arg!r}.')
  c = ml_collections.ConfigDict()
  c.job = 'rmjax.eval.reward_bench:run'
  c.model = ml_collections.ConfigDict(dict(source='hf', path='', dtype='float32'))
  c.tokenizer = ''                     # tokenizer folder; '' = the model's own
  c.data = ml_collections.ConfigDict(dict(path='', chat_template=False))  # True: prompt as a user turn
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, seq_len=512, aggregate='mean', normalize=True,
                                          num_bins=10, padding_side='right'))
  return c
