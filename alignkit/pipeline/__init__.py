"""Pipelines of trainer runs: the quickstart's typed recipe (`recipe.py`) and its stages (`stages.py`)."""

from __future__ import annotations

from alignkit.pipeline.recipe import QuickstartRecipe, check_stage_order, load_recipe
from alignkit.pipeline.stages import STAGES, StageContext, StageResult, run_pipeline

__all__ = ["STAGES", "QuickstartRecipe", "StageContext", "StageResult", "check_stage_order", "load_recipe",
           "run_pipeline"]
