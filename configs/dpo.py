"""DPO / IPO on preference pairs (`rmjax.rl.dpo`): `python -m rmjax.main --config=configs/dpo.py[:ARG] --workdir=DIR`.

ARG: `tiny` (default) or `test` (seconds), optionally `,ipo` (e.g. `test,ipo`). Defaults: a fresh
tiny policy on a toy preference the job writes itself; `--config.policy.path=W/policy/checkpoints
--config.data.source=tfds --config.data.path=W/data` trains on the pairs of the reward-model job
(`configs/rm.py`) instead.
"""
from rmjax.rl.dpo import get_config  # noqa: F401
