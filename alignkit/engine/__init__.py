"""What every trainer shares: optimizer and schedule, precision, accumulation, clipping, checkpoints, logging,
distributed wrapping. Trainers build a model, a step stream and a loss function, and hand them to `Engine`."""

from alignkit.engine.batches import StepBatches
from alignkit.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from alignkit.engine.distributed import DistInfo, close_distributed, init_distributed, unwrap, wrap_model
from alignkit.engine.loop import Engine, NonFiniteLossError
from alignkit.engine.optim import build_optimizer, lr_at, lr_schedule, param_groups
from alignkit.engine.precision import autocast

__all__ = [
    "DistInfo", "Engine", "NonFiniteLossError", "StepBatches", "autocast", "build_optimizer", "close_distributed",
    "init_distributed",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "lr_at", "lr_schedule", "param_groups",
    "save_checkpoint", "unwrap", "wrap_model",
]
