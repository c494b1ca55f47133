"""rmjax.eval: reward-model evaluation (`reward_bench`: RewardBench-style accuracy, calibration, disagreement)."""
