"""The quickstart recipe: one typed config for the whole pipeline, loaded through `alignkit.config`.

Every section is checked when the recipe loads, key by key and typed, before any stage runs: the task's data
settings, the tokenizer, each training stage's section (an ordinary `alignkit train <stage>` config), the
evaluation. A recipe may start from another (`base: packaged:quickstart.yaml`, or a path relative to it) and list
only what it changes; sections merge key by key. `--fast` applies the recipe's `fast:` section, and command-line
overrides (`pretrain.train.max_steps=200`) win over both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from alignkit.config import config_from_dict, config_to_dict
from alignkit.errors import ConfigError, check_at_least
from alignkit.tasks.arithmetic import NEAR_MISS_SHARE
from alignkit.trainers.configs import PretrainConfig, SFTConfig, StageConfig
from alignkit.trainers.preference_configs import DPOConfig, RMConfig
from alignkit.trainers.rl_configs import GRPOConfig, PPOConfig, RSConfig

PACKAGED_RECIPE = "quickstart.yaml"
STAGE_NAMES = ("data", "tokenizer", "pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "ppo_ptx", "evaluate",
               "report")


@dataclass
class TaskDataSection:
    # 1: + and - up to 20, x up to 9; 2: up to 50 / 12; 3: two-digit numbers.
    difficulty: int = 1
    # Problems written as plain text (with filler sentences) for pretraining.
    pretrain_problems: int = 20000
    # Problems per pretraining document (about 35 tokens each; a document should fit pretrain.data.max_length).
    problems_per_document: int = 6
    # Chat records (user question, assistant worked answer) for SFT.
    sft_problems: int = 5000
    # Share of SFT demonstrations that use a wrong operation (a sloppy annotator).
    sft_wrong_operation_share: float = 0.0
    # Held-out problems: SFT eval loss, and the accuracy of every evaluated model.
    eval_problems: int = 200
    # Preference pairs for rm and dpo (training operand pairs): the correct solution against a wrong one.
    preference_problems: int = 2000
    # Share of rejected answers that are near misses (the right operation, a neighbouring pair's answer).
    preference_near_miss_share: float = NEAR_MISS_SHARE
    # Held-out preference pairs (held-out operand pairs): rm / dpo eval, and preference accuracy in evaluate.
    preference_eval_problems: int = 300
    # Prompts {question, answer} for rs and grpo (training operand pairs, new wordings).
    grpo_problems: int = 4000

    def __post_init__(self) -> None:
        if self.difficulty not in (1, 2, 3):
            raise ConfigError(f"data.difficulty must be 1, 2 or 3; got {self.difficulty}.")
        check_at_least("data", self, 1, ("pretrain_problems", "problems_per_document", "sft_problems",
                                         "eval_problems", "preference_problems", "preference_eval_problems",
                                         "grpo_problems"))
        for name in ("sft_wrong_operation_share", "preference_near_miss_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name} must be a share in [0, 1]; got {getattr(self, name)}.")


@dataclass
class TokenizerStageSection:
    # Size of the byte-level BPE trained on the pretraining text.
    vocab_size: int = 512
    # Chat template whose special tokens the tokenizer gets.
    template: Literal["chatml", "llama3"] = "chatml"

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"tokenizer.vocab_size must be at least 260 (256 bytes + special tokens); got "
                              f"{self.vocab_size}.")


@dataclass
class EvaluateSection:
    # Language models (stages whose final model is evaluated on the task and on the held-out pairs).
    models: list[str] = field(default_factory=lambda: ["pretrain", "sft"])
    # Reward models: accuracy on the held-out pairs.
    reward_models: list[str] = field(default_factory=list)
    # The two models the summary compares.
    compare: list[str] = field(default_factory=lambda: ["sft", "dpo"])
    # New tokens per answer.
    max_new_tokens: int = 24
    # Problems (or pairs) per batch.
    batch_size: int = 64
    # Longest conversation scored for the held-out loss and preference accuracy (longer ones are cut).
    max_length: int = 256
    # Also sample this many answers per held-out problem at `temperature` (accuracy/heldout_sampled; 0 = off).
    samples_per_problem: int = 0
    # Sampling temperature of those answers.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if len(self.compare) != 2:
            raise ConfigError(f"evaluate.compare is {self.compare!r}; it names two evaluated models, e.g. [sft, dpo].")
        check_at_least("evaluate", self, 1, ("max_new_tokens", "batch_size", "max_length"))
        if self.samples_per_problem < 0 or self.temperature < 0:
            raise ConfigError("evaluate.samples_per_problem and evaluate.temperature must be >= 0.")


@dataclass
class PTXStageSection:
    # The ppo stage again (its section, seed and steps) with the PTX loss on: ppo.ptx_coef set to this.
    ptx_coef: float = 0.2

    def __post_init__(self) -> None:
        if not self.ptx_coef > 0:
            raise ConfigError(f"ppo_ptx.ptx_coef must be > 0 (the stage compares PPO with PTX against ppo); got "
                              f"{self.ptx_coef}.")


@dataclass
class QuickstartRecipe:
    """The whole quickstart pipeline: which stages run, and each stage's settings."""

    # Seed of the generated data and of every stage (each stage's train.seed is set to it).
    seed: int = 0
    # Stages to run, in order.
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    # The generated task data.
    data: TaskDataSection = field(default_factory=TaskDataSection)
    # The BPE tokenizer trained on the pretraining text.
    tokenizer: TokenizerStageSection = field(default_factory=TokenizerStageSection)
    # Pretraining from scratch (an `alignkit train pretrain` config; the pipeline fills tokenizer and data paths).
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # SFT of the pretrained model (an `alignkit train sft` config).
    sft: SFTConfig = field(default_factory=SFTConfig)
    # Reward model from the SFT model (an `alignkit train rm` config).
    rm: RMConfig = field(default_factory=RMConfig)
    # DPO from the SFT model (an `alignkit train dpo` config).
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Rejection sampling from the SFT model, the task's checker as the judge (an `alignkit train rs` config).
    rs: RSConfig = field(default_factory=RSConfig)
    # GRPO from the SFT model with the task's checker as the reward (an `alignkit train grpo` config).
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # PPO from the SFT model against the rm stage's reward model (an `alignkit train ppo` config; the pipeline fills
    # the reward, the prompts, the PTX text and the forgetting monitor's task).
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # The ppo stage again with the PTX loss on.
    ppo_ptx: PTXStageSection = field(default_factory=PTXStageSection)
    # The held-out evaluation of every listed model.
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    # Overrides `--fast` applies (dotted keys): the whole pipeline in seconds, for tests.
    fast: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r} in `stages`; the stages are {', '.join(STAGE_NAMES)}.")


# What each stage takes from earlier ones: {stage: {earlier stage: what for}}. `check_stage_order` reads it so that
# a recipe listing stages in an impossible order fails before anything runs; `evaluate` also needs every model it
# lists (`evaluate.models`, `evaluate.reward_models`).
NEEDS: dict[str, dict[str, str]] = {
    "tokenizer": {"data": "the pretraining text to train the tokenizer on"},
    "pretrain": {"data": "the pretraining text", "tokenizer": "the tokenizer"},
    "sft": {"data": "the chat records", "pretrain": "the pretrained model to fine-tune"},
    "rm": {"data": "the preference pairs", "sft": "the SFT model the reward model starts from"},
    "dpo": {"data": "the preference pairs", "sft": "the SFT model, which is both the starting policy and the reference"},
    "rs": {"data": "the RL prompts", "sft": "the SFT model rejection sampling starts from"},
    "grpo": {"data": "the RL prompts", "sft": "the SFT model GRPO starts from"},
    "ppo": {"data": "the RL prompts and the pretraining text", "sft": "the SFT model PPO starts from",
            "rm": "the reward model PPO optimises"},
    "ppo_ptx": {"data": "the RL prompts and the pretraining text", "sft": "the SFT model PPO starts from",
                "rm": "the reward model PPO optimises"},
    "evaluate": {"data": "the held-out problems and preference pairs"},
}


def check_stage_order(recipe: QuickstartRecipe, *, source: str = "recipe") -> None:
    """A ConfigError naming the stage and what it lacks when a stage comes before (or without) one it needs."""
    stages = list(recipe.stages)
    for position, name in enumerate(stages):
        needs = dict(NEEDS.get(name, {}))
        if name == "evaluate":
            for model in [*recipe.evaluate.models, *recipe.evaluate.reward_models]:
                needs.setdefault(str(model), "a model it evaluates (evaluate.models / evaluate.reward_models)")
        for needed, why in needs.items():
            if needed in stages[:position]:
                continue
            where = "comes after it" if needed in stages else "is not in the list"
            raise ConfigError(
                f"{source}: stage {name!r} needs stage {needed!r} ({why}), but {needed!r} {where}; put {needed!r} "
                f"before {name!r} in `stages` (the full order is {', '.join(STAGE_NAMES)})."
            )


# The stages that are `alignkit train` runs, and the trainer each one runs.
TRAINERS: dict[str, str] = {"pretrain": "pretrain", "sft": "sft", "rm": "rm", "dpo": "dpo", "rs": "rs", "grpo": "grpo",
                            "ppo": "ppo", "ppo_ptx": "ppo"}


def stage_config(recipe: QuickstartRecipe, name: str, path: Callable[[str, str], str], *, output_dir: str,
                 source: str = "recipe") -> StageConfig:
    """The `alignkit train` config that training stage `name` runs: its recipe section with what the pipeline fills
    in (`path(stage, key)`: a file or folder an earlier stage writes; train.seed; train.output_dir), built and
    checked again as a whole, so that a setting at odds with what the pipeline fills in fails here, not when the
    stage starts. `load_recipe` calls it for every listed stage with placeholder paths before anything runs."""
    section = recipe.ppo if name == "ppo_ptx" else getattr(recipe, name)
    fills: dict[str, Any] = {"train.seed": recipe.seed, "train.output_dir": output_dir}
    if name == "pretrain":
        fills |= {"tokenizer": path("tokenizer", "tokenizer_dir"), "data.train": path("data", "pretrain_text"),
                  "data.format": "text"}
    elif name == "sft":
        fills |= {"model.path": path("pretrain", "model_dir"), "data.train": path("data", "sft_train"),
                  "data.eval": path("data", "sft_eval"), "data.format": "chat"}
    elif name in ("rm", "dpo"):
        fills |= {"model.path": path("sft", "model_dir"), "data.train": path("data", "preferences"),
                  "data.eval": path("data", "preferences_eval")}
    elif name in ("rs", "grpo"):
        fills |= {"model.path": path("sft", "model_dir"), "data.train": path("data", "grpo_prompts")}
    elif name in ("ppo", "ppo_ptx"):
        # The reward is the rm stage's model. The forgetting monitor: LM loss on held-out pretraining text
        # (eval/ptx_loss) and the held-out problems asked as plain text (eval/heldout_plain_text/accuracy); the
        # text is also the PTX data when ppo.ptx_coef > 0.
        fills |= {"model.path": path("sft", "model_dir"), "data.train": path("data", "grpo_prompts"),
                  "ppo.reward_funcs": [f"rm:{path('rm', 'model_dir')}"], "ppo.reward_weights": None,
                  "ptx.train": path("data", "pretrain_text"), "ptx.format": "text",
                  "eval.tasks": [path("data", "heldout_plain_text")]}
        if name == "ppo_ptx":
            fills["ppo.ptx_coef"] = recipe.ppo_ptx.ptx_coef
    else:
        raise ValueError(f"{name!r} is not a training stage; the training stages are {', '.join(TRAINERS)}.")
    where = f"{source}, stage {name} (its section `{'ppo' if name == 'ppo_ptx' else name}` with what the pipeline fills in)"
    return config_from_dict(type(section), config_to_dict(section), source=where, updates=fills)


def check_stage_configs(recipe: QuickstartRecipe, *, source: str = "recipe") -> None:
    """Build every listed training stage's config with placeholder paths: what stage_config checks, at load."""
    for name in recipe.stages:
        if name in TRAINERS:
            stage_config(recipe, name, lambda stage, key: f"<{stage}/{key}>", output_dir=f"<{name}>", source=source)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: `override` wins, dicts merge key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """A recipe file as a dict and its name for messages; `base:` (a path, or `packaged:<name>`) is read first and
    merged under."""
    if path is None or str(path).startswith("packaged:"):
        name = PACKAGED_RECIPE if path is None else str(path).split(":", 1)[1]
        source = f"alignkit/recipes/{name}"
        try:
            text = resources.files("alignkit").joinpath("recipes").joinpath(name).read_text()
        except FileNotFoundError:
            raise ConfigError(f"there is no packaged recipe {name!r}; the packaged one is {PACKAGED_RECIPE}.") from None
    else:
        if not Path(path).is_file():
            raise ConfigError(f"recipe {path} does not exist; pass the path of a YAML recipe to --recipe.")
        text, source = Path(path).read_text(), str(path)
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{source}: a quickstart recipe is a YAML mapping of sections; this file is not.")
    base = recipe.pop("base", None)
    if base is not None:
        if path is not None and not str(base).startswith("packaged:") and not Path(base).is_absolute():
            base = Path(path).parent / base
        parent, _ = read_recipe(base)
        recipe = merge(parent, recipe)
    return recipe, source


def load_recipe(path: str | Path | None, *, fast: bool = False, overrides: list[str] = ()) -> QuickstartRecipe:
    """The recipe at `path` (default: the packaged one), typed and checked, with `--fast` and `key=value`
    overrides applied (the command line wins)."""
    data, source = read_recipe(path)
    updates = dict(data.get("fast") or {}) if fast else {}
    where = f"{source} with the command-line overrides" if overrides else source
    recipe = config_from_dict(QuickstartRecipe, data, source=where, updates=updates, overrides=overrides)
    check_stage_order(recipe, source=where)
    check_stage_configs(recipe, source=where)
    return recipe
