"""What every trainer shares: optimizers and schedules per model, precision, accumulation, clipping, metric
reduction, FLOP counting and MFU, checkpoints and resume, logging, distributed wrapping. A trainer builds its
models, its step source and its loss functions, and drives `Engine` one step at a time (see `engine/loop.py`)."""

from alignkit.engine.batches import StepBatches
from alignkit.engine.checkpoint import latest_checkpoint, list_checkpoints
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.engine.distributed import DistInfo, close_distributed, init_distributed, unwrap, wrap_model
from alignkit.engine.loop import Engine, Frozen, Models, NonFiniteLossError, Trainable, count_tokens
from alignkit.engine.metrics import Metric, maximum, mean, minimum, reduce_metrics, total
from alignkit.engine.optim import build_optimizer, lr_at, lr_schedule, param_groups
from alignkit.engine.precision import autocast

__all__ = [
    "DistInfo", "Engine", "Frozen", "Metric", "Models", "NonFiniteLossError", "OptimSection", "StepBatches",
    "TrainSection", "Trainable", "autocast", "build_optimizer", "close_distributed", "count_tokens",
    "init_distributed", "latest_checkpoint", "list_checkpoints", "lr_at", "lr_schedule", "maximum", "mean",
    "minimum", "param_groups", "reduce_metrics", "total", "unwrap", "wrap_model",
]
