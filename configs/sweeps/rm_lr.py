"""A learning-rate sweep of the reward-model job (`configs/rm.py`): 4 points.

  python -m launch.local --config=configs/sweeps/rm_lr.py:test --workdir=DIR --parallel 2

`get_config(arg)` is `configs/rm.py`'s; `get_sweep(arg)` crosses 2 learning rates with 2 seeds of
the reward models' initialisation, each point in its own sub-workdir (e.g.
`DIR/optim.lr=0.001,seed=0/`). `arg` is a variant of `configs/rm.py` (tiny, test, small).
"""
import pathlib

import ml_collections

from launch import sweep
from rmjax import config as C

_RM = pathlib.Path(__file__).resolve().parent.parent / 'rm.py'


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  return C.load_config_file(f'{_RM}:{arg}')


def get_sweep(arg: str = 'tiny') -> list[dict]:
  del arg  # the same points for every variant
  return sweep.product(sweep.axis('optim.lr', (1e-3, 3e-3)), sweep.axis('seed', (0, 1)))
