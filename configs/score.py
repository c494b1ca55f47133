"""Re-score saved policies or rollouts under another reward model or objective (`rmjax.rl.score`).

`python -m rmjax.main --config=configs/score.py[:test] --workdir=DIR --config.reward.path=RM
--config.score.policies=RUN/checkpoints --config.score.rollouts=RUN/rollouts`; writes
`DIR/scores.jsonl` and `DIR/scores.md`.
"""
from rmjax.rl.score import get_config  # noqa: F401
