"""GRPO on the RL trainer (`rmjax.rl.trainer`): `python -m rmjax.main --config=configs/grpo.py[:test] --workdir=DIR`.

Defaults (`tiny`): a fresh tiny policy and the toy reward (count of the letter 'e') unless
`--config.policy.path` / `--config.reward.path` name checkpoints; `test` is a seconds-long variant.
"""
from rmjax.rl.trainer import base_config


def get_config(arg: str = 'tiny'):
  c = base_config('grpo', arg)
  c.objective.loss = 'ppo_clip,kl_k3'
  del c.objective['kl_k2']
  c.objective.kl_k3 = dict(coef=0.05)
  c.objective.reduction = 'seq_mean_token_mean'
  return c
