"""rmjax.train: train state, optimizers, the outer loop, trainers, checkpoints, metrics."""
from rmjax.train.checkpoint import CheckpointError, Checkpointer, TargetMismatchError, code_version, config_hash, load
from rmjax.train.metrics import MetricsWriter, read_metrics
from rmjax.train.state import TrainState
