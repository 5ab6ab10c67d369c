"""Training stages. `alignkit.trainers.run("sft", cfg)`; `alignkit train <stage>` on the command line.

STAGES maps a stage name to the module that implements it. Each module defines `Config` (its dataclass config),
`train(cfg) -> RunResult`, and a docstring whose first line is the stage's one-line help. A new stage adds one
line here; modules are imported only when their stage runs, so `alignkit train --help` stays fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from alignkit.errors import ConfigError
from alignkit.trainers.common import RunResult

STAGES: dict[str, str] = {
    "pretrain": "alignkit.trainers.pretrain",
    "sft": "alignkit.trainers.sft",
    "rm": "alignkit.trainers.rm",
    "dpo": "alignkit.trainers.dpo",
    "grpo": "alignkit.trainers.grpo",
    "rs": "alignkit.trainers.rs",
    "ppo": "alignkit.trainers.ppo",
}


def stage_module(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise ConfigError(f"Unknown training stage {stage!r}; the stages are {', '.join(STAGES)}.")
    return importlib.import_module(STAGES[stage])


def run(stage: str, cfg: Any) -> RunResult:
    """Train `stage` with its config (a `<Stage>Config` instance, e.g. from `load_config`)."""
    module = stage_module(stage)
    if not isinstance(cfg, module.Config):
        raise ConfigError(f"Stage {stage!r} takes a {module.Config.__name__}, not a {type(cfg).__name__}.")
    return module.train(cfg)


__all__ = ["STAGES", "RunResult", "run", "stage_module"]
