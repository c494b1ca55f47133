"""Best-of-n curves (`rmjax.rl.bon_job`): `python -m rmjax.main --config=configs/bon.py[:test] --workdir=DIR`.

One pass of `bon.num_samples` draws per held-out prompt gives the unbiased best-of-n proxy (and
gold) curve for every n in `bon.ns` (a comma-separated string), with both KL measurements.
"""
import ml_collections

from rmjax.rl.trainer import base_config


def get_config(arg: str = 'tiny'):
  c = base_config('rloo', arg)
  c.job = 'rmjax.rl.bon_job:run'
  c.objective = ml_collections.ConfigDict(dict(reward='mean'))
  c.bon = ml_collections.ConfigDict(dict(num_samples=1024, chunk=256, ns='1,2,4,16,64,256,1024', max_new_tokens=24,
                                         temperature=1.0))
  if arg == 'test':
    c.bon.update(num_samples=64, chunk=32, ns='1,4,64', max_new_tokens=6)
  return c
