"""RLOO on the RL trainer (`rmjax.rl.trainer`): `python -m rmjax.main --config=configs/rloo.py[:test] --workdir=DIR`.

Defaults (`tiny`): a fresh tiny policy and the toy reward (count of the letter 'e') unless
`--config.policy.path` / `--config.reward.path` name checkpoints; `test` is a seconds-long variant.
"""
from rmjax.rl.trainer import base_config


def get_config(arg: str = 'tiny'):
  return base_config('rloo', arg)
