"""Next-token training of a policy: pretraining on the built-in synthetic language (default) or
on local text files, with the byte tokenizer.

`python -m rmjax.main --config=configs/sft.py --workdir=DIR`; variants `tiny` (default),
`test` (seconds), `small`. Local files: `--config.data.source=files --config.data.files=a.jsonl,b.txt`.
"""
import ml_collections

from rmjax import config as C

VARIANTS = ('tiny', 'test', 'small')


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f'configs/sft.py: unknown variant {arg!r}; choose one of {VARIANTS}.')
  c = ml_collections.ConfigDict()
  c.job = 'experiments.sft:run'
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(source='grammar', files='', num_documents=8192, seq_len=128))
  c.model = C.model(arg if arg != 'test' else 'tiny')
  c.optim = C.optim(lr=3e-3, warmup_steps=20)
  c.train = C.train(300, batch_size=32, checkpoint_every=100)
  c.mesh = C.mesh()
  if arg == 'test':
    c.data.num_documents = 256
    c.data.seq_len = 64
    c.model = C.model('tiny', width=32, mlp_width=64, num_layers=1, num_heads=2, num_kv_heads=1)
    c.train = C.train(6, batch_size=8, log_every=2, checkpoint_every=3)
  return c
