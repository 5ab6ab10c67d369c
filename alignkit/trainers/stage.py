"""The skeleton every training stage shares once its model and data are ready: the held-out split, evaluation
sharded over ranks, the run directory (with the checks that make resuming safe), the engine, training and the
final export. A stage file reads top to bottom: build the model, load the data, call `train_stage`.

    return train_stage(cfg, info, model, tokenizer, train_items=items, eval_items=held_out, collate=collate,
                       loss_fn=loss_fn, evaluate_batch=evaluate_batch)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from alignkit.config import config_to_dict, save_config
from alignkit.engine import DistInfo, Engine, Frozen, Models, StepBatches, Trainable, count_tokens
from alignkit.engine import distributed as dist
from alignkit.engine.loop import LossFn
from alignkit.engine.metrics import MetricAccumulator, total
from alignkit.errors import ConfigError, DataError
from alignkit.tokenizer import Tokenizer
from alignkit.trainers.common import RunResult, add_lora, total_steps
from alignkit.trainers.configs import DataSection, EvalSection, LoRASection

logger = logging.getLogger(__name__)
Item = TypeVar("Item")
COUNT = "__count__"
# One held-out micro-batch: (metric sums over its items, its number of items); the evaluation reports each sum over
# all batches and ranks divided by the total count.
EvalBatchFn = Callable[[Models, Any], tuple[Mapping[str, float], float]]


# ---------------------------------------------------------------------------------------------- data


def hold_out(items: list[Item], data: DataSection, *, what: str = "examples") -> tuple[list[Item], list[Item]]:
    """(train, held out): a seeded random data.eval_size (or eval_fraction) of `items`, the same split for every
    run with the same data.seed whatever train.seed is. A held-out size of more than half the items (a recipe's
    eval_size on a quick run with data.limit) is scaled down to a quarter of them, with a logged note."""
    size = data.eval_size if data.eval_size is not None else math.ceil(data.eval_fraction * len(items))
    if size <= 0:
        return items, []
    if 2 * size > len(items):
        scaled = len(items) // 4
        logger.warning(
            f"{data.train}: holding out {size} of {len(items)} {what} for evaluation would leave "
            f"{max(len(items) - size, 0)} to train on; holding out {scaled} (a quarter) instead. Set data.eval_size "
            "(or data.eval, a held-out file) to choose."
        )
        size = scaled
        if size == 0:
            return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(data.seed)).tolist()
    held = set(order[:size])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def sharded_eval(items: list[Any], collate: Callable[[list[Any]], Any], batch_size: int, info: DistInfo,
                 evaluate_batch: EvalBatchFn, *, finish: Callable[[dict[str, float]], dict[str, float]] | None = None
                 ) -> Callable[[Models], dict[str, float]]:
    """An evaluation over all ranks: each rank scores its share (items[rank::world_size]) in micro-batches; every
    metric is its sum over all batches of all ranks divided by their total count (in float64), and `finish` may
    derive more (perplexity from loss). Keys come back as eval/<name>."""
    mine = items[info.rank :: info.world_size]

    def evaluate(models: Models) -> dict[str, float]:
        sums = MetricAccumulator(torch.device("cpu"))
        for start in range(0, len(mine), batch_size):
            batch_sums, count = evaluate_batch(models, collate(mine[start : start + batch_size]))
            sums.add({key: total(value) for key, value in batch_sums.items()} | {COUNT: total(count)}, 1.0)
        values = sums.result(complete=True)  # a rank whose share is empty still takes part
        count = values.pop(COUNT, 0.0)
        values = {key: value / max(count, 1.0) for key, value in values.items()}
        if finish is not None:
            values = finish(values)
        return {f"eval/{key}": value for key, value in values.items()}

    return evaluate


def combine_evals(*fns: Callable[[Models], dict[str, float]] | None) -> Callable[[Models], dict[str, float]] | None:
    """One evaluation running each given one in turn (None when none is given)."""
    present = [fn for fn in fns if fn is not None]
    if not present:
        return None

    def evaluate(models: Models) -> dict[str, float]:
        return {key: value for fn in present for key, value in fn(models).items()}

    return evaluate


def task_eval(section: EvalSection, tokenizer: Tokenizer, info: DistInfo,
              generation_model: Callable[[], ContextManager[nn.Module]]) -> Callable[[Models], dict[str, float]] | None:
    """The eval section's capability checks (None when it lists no task), each rank scoring its share of every
    task's records with the model `generation_model()` yields, the metrics summed over all ranks:

    - `tasks`: questions answered greedily and checked; eval/<task>/accuracy is the share answered correctly;
    - `icl_tasks`: few-shot tasks as `alignkit eval` scores them; eval/<task>/acc and acc_norm (multiple choice)
      or acc and perplexity (LAMBADA).

    Every task file is read and checked here, before training starts."""
    from alignkit.eval.harness import evaluate_task, prepare, reported_metrics
    from alignkit.eval.tasks import Task, load_task
    from alignkit.eval.verifiable import load_problems, reward_check, verifiable_accuracy

    if not section.tasks and not section.icl_tasks:
        return None
    check = reward_check(section.check)
    tasks = {Path(path).name.removesuffix(".jsonl").removesuffix(".json"): load_problems(path)
             for path in section.tasks}
    icl_tasks = []
    for spec in section.icl_tasks:
        task = load_task(spec)
        pool, docs = prepare(task, [section.icl_shots], limit=section.icl_limit)
        # This rank's share, behind the shot pool that every rank's prompts start with.
        icl_tasks.append(Task(task.name, task.path, task.layout, pool + docs[info.rank :: info.world_size]))

    def evaluate(models: Models) -> dict[str, float]:
        out = {}
        with generation_model() as model:
            for name, problems in tasks.items():
                mine = problems[info.rank :: info.world_size]
                result = verifiable_accuracy(model, tokenizer, mine, max_new_tokens=section.max_new_tokens,
                                             batch_size=section.batch_size, is_correct=check,
                                             prompt_format=section.prompt_format) if mine else {"num_correct": 0}
                correct = dist.all_reduce_sum(torch.tensor([float(result["num_correct"]), float(len(mine))]))
                out[f"eval/{name}/accuracy"] = float(correct[0] / correct[1].clamp(min=1))
            for task in icl_tasks:
                num_scored = len(task.docs) - section.icl_shots
                # Means weighted by each rank's count; perplexity = exp(-mean log-likelihood), so its log averages.
                sums = {m: 0.0 for m in reported_metrics(task)}
                if num_scored > 0:
                    (result,) = evaluate_task(model, tokenizer, task, [section.icl_shots],
                                              shot_pool=section.icl_shots)
                    sums = {m: (math.log(result.metrics[m]) if m == "perplexity" else result.metrics[m])
                            * num_scored for m in sums}
                names = sorted(sums)
                total = dist.all_reduce_sum(torch.tensor([sums[m] for m in names] + [float(max(num_scored, 0))],
                                                         dtype=torch.float64))
                for i, m in enumerate(names):
                    mean = float(total[i] / total[-1].clamp(min=1))
                    out[f"eval/{task.name}/{m}"] = math.exp(mean) if m == "perplexity" else mean
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------- run directory


# Settings a resumed run must share with the run it continues: they fix the shapes of the trained tensors, the
# model they start from, or what each step number means.
RESUME_KEYS = ("model.path", "model.init", "model.dtype", "tokenizer", "lora.enabled", "lora.rank",
               "lora.target_modules", "data.train", "data.max_length", "data.packing", "train.batch_size",
               "train.seed")


def stage_name(cfg: Any) -> str:
    """`sft` for an SFTConfig, `dpo` for a DPOConfig, ...: what run.json records."""
    return type(cfg).__name__.removesuffix("Config").lower()


def check_resume(run_dir: Path, cfg: Any) -> None:
    """Refuse, before anything is written, to resume a run of another stage, with settings that change what was
    trained, or from a folder whose only checkpoints were cut off mid-save."""
    import yaml

    from alignkit.engine.checkpoint import CHECKPOINTS, list_checkpoints

    stage = stage_name(cfg)
    info_path = run_dir / "run.json"
    if info_path.is_file():
        saved_stage = json.loads(info_path.read_text()).get("stage")
        if saved_stage != stage:
            raise ConfigError(
                f"{run_dir} holds a '{saved_stage}' run; it cannot be resumed by `alignkit train {stage}`. Resume it "
                f"with `alignkit train {saved_stage}`, or choose another train.output_dir."
            )
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file() and list_checkpoints(run_dir):
        old = config_to_dict_flat(yaml.safe_load(saved_config.read_text()) or {})
        new = config_to_dict_flat(config_to_dict(cfg))
        for key in RESUME_KEYS:
            if old.get(key) != new.get(key):
                raise ConfigError(
                    f"Resuming {run_dir} with {key}={new.get(key)!r}, but its checkpoints were trained with "
                    f"{key}={old.get(key)!r}; resume with the same value, or start a new run in another "
                    "train.output_dir."
                )
    partial = sorted((run_dir / CHECKPOINTS).glob(".tmp-*")) if (run_dir / CHECKPOINTS).is_dir() else []
    if partial and not list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} holds only {partial[-1].name}, a checkpoint cut off while it was being written; there is "
            "nothing complete to resume. Delete the folder, or start over without --resume in another "
            "train.output_dir."
        )


def config_to_dict_flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"path": x}} -> {"model.path": x}; lists and model.init stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "model.init":
            flat.update(config_to_dict_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare_run_dir(cfg: Any, info: DistInfo) -> Path:
    """Check a resumed run against the one it continues, then create the run directory and write the resolved
    config.yaml and run.json (rank 0)."""
    from alignkit.engine.checkpoint import refuse_restart

    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume:
        check_resume(run_dir, cfg)
    else:  # before config.yaml is written over the earlier run's
        refuse_restart(run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({"stage": stage_name(cfg)}) + "\n")
    dist.barrier()
    return run_dir


# ---------------------------------------------------------------------------------------------- train


def train_stage(
    cfg: Any,
    info: DistInfo,
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    train_items: list[Any],
    eval_items: list[Any],
    collate: Callable[[list[Any]], Any],
    loss_fn: LossFn,
    evaluate_batch: EvalBatchFn | None = None,
    eval_finish: Callable[[dict[str, float]], dict[str, float]] | None = None,
    count_fn: Callable[[Any], int] = count_tokens,
    count_unit: str = "tokens",
    data_stats: dict[str, Any] | None = None,
    frozen: Mapping[str, Frozen] | None = None,
    state: Mapping[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> RunResult:
    """Batch, evaluate, checkpoint, train and export one model: what every supervised stage does the same way.

    `frozen` models join the engine (their sources are checked on resume); `prepare(run_dir)` runs once the run
    directory exists and before the first step (DPO precomputes its reference log-probs there); `state` objects go
    into every checkpoint; `on_step` sees each step's row.
    """
    check_one_batch(cfg, info, len(train_items), len(eval_items))
    batches = StepBatches(train_items, collate=collate, batch_size=cfg.train.batch_size,
                          micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                          rank=info.rank, world_size=info.world_size, source=cfg.data.train)
    steps = total_steps(cfg.train, batches.steps_per_epoch)
    eval_fn = None
    if eval_items and evaluate_batch is not None:
        eval_fn = sharded_eval(eval_items, collate, cfg.train.micro_batch_size, info, evaluate_batch,
                               finish=eval_finish)
    if getattr(cfg, "eval", None) is not None:
        # The eval section's task files are read and checked now, before the run directory is written; the model
        # comes from the engine made below, when an evaluation runs.
        eval_fn = combine_evals(eval_fn, task_eval(cfg.eval, tokenizer, info,
                                                   lambda: engine.generation_model("model")))
    run_dir = prepare_run_dir(cfg, info)
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer")
        if data_stats is not None:
            (run_dir / "data_stats.json").write_text(json.dumps(data_stats, indent=2) + "\n")
    engine = Engine({"model": Trainable(model, cfg.optim)}, cfg.train, run_dir=run_dir, total_steps=steps,
                    frozen=frozen, dist_info=info, count_fn=count_fn, count_unit=count_unit,
                    config_dict=config_to_dict(cfg))
    if prepare is not None:
        prepare(run_dir)
    metrics = engine.train(batches, loss_fn, eval_fn=eval_fn, state=state, on_step=on_step)
    final = export(model, tokenizer, run_dir, lora=cfg.lora, base_model=cfg.model.path, info=info)
    return RunResult(run_dir=run_dir, final_model_dir=final, metrics=metrics)


def check_one_batch(cfg: Any, info: DistInfo, num_items: int, num_held_out: int) -> None:
    """A DataError listing every setting that would make a training set smaller than one global batch fit (a quick
    run with data.limit): the batch size it fills, packing, the limit, the held-out share, in one message."""
    batch_size, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    if num_items >= batch_size:
        return
    data = cfg.data
    packed = data.packing if data.packing is not None else info.device.type == "cpu"
    unit = f"rows (examples packed into rows of up to data.max_length={data.max_length} tokens)" if packed else "examples"
    changes: list[str] = []
    fits = num_items - num_items % info.world_size  # the largest global batch this data fills, one share per rank
    if fits > 0:
        per_rank = fits // info.world_size
        fits_micro = max(m for m in range(1, min(micro, per_rank) + 1) if per_rank % m == 0)
        changes.append(f"train.batch_size={fits} train.micro_batch_size={fits_micro} (the largest batch it fills)")
    if packed:
        changes.append("data.packing=false (one example per row: more rows)")
    if data.limit is not None:
        changes.append(f"a larger data.limit (now {data.limit}) or none")
    else:
        changes.append("more records in data.train")
    if num_held_out and not data.eval:
        held = f"data.eval_size={data.eval_size}" if data.eval_size is not None else f"data.eval_fraction={data.eval_fraction}"
        changes.append(f"fewer held-out records (now {held}; 0 holds none out, data.eval names a held-out file)")
    raise DataError(
        f"{data.train}: the training set has {num_items} {unit}, fewer than one global batch of "
        f"train.batch_size={batch_size}" + (f" over {info.world_size} processes" if info.world_size > 1 else "")
        + ". To train on this little data, change any of: " + "; ".join(changes) + "."
    )


def check_prompt_batch(cfg: Any, num_prompts: int, prompts_per_step: int) -> None:
    """For the RL stages: a DataError listing every setting to change when fewer prompts survived loading than one
    iteration samples from (train.batch_size completions / rollout.num_generations per prompt), in one message."""
    if num_prompts >= prompts_per_step:
        return
    g, batch_size = cfg.rollout.num_generations, cfg.train.batch_size
    changes = [f"train.batch_size={num_prompts * g} (the most {num_prompts} prompts x {g} completions fill)"]
    if g > 1:
        changes.append(f"a smaller rollout.num_generations (now {g}) with the same train.batch_size")
    changes.append(f"a larger data.limit (now {cfg.data.limit}) or none" if cfg.data.limit is not None
                   else "more records in data.train")
    changes.append(f"a larger rollout.max_prompt_length (now {cfg.rollout.max_prompt_length}) if prompts were dropped "
                   "as too long (the log says how many)")
    raise DataError(
        f"{cfg.data.train}: {num_prompts} prompts, fewer than one iteration's {prompts_per_step} (train.batch_size="
        f"{batch_size} completions / rollout.num_generations={g} per prompt). To train on this little data, change "
        "any of: " + "; ".join(changes) + "."
    )


def export(model: nn.Module, tokenizer: Tokenizer, run_dir: Path, *, lora: LoRASection, base_model: str | None,
           info: DistInfo, folder: str = "final", adapter_folder: str = "adapter") -> Path:
    """Full model -> run_dir/folder (HF format with the tokenizer). LoRA -> adapter_folder (peft format) and the
    merged model in folder; the merge happens on a copy, so the live model (whose frozen base another model may
    share) is left as it was.

    Collective: under FSDP2 the shards are gathered into one full copy on rank 0 first."""
    import copy

    from alignkit.checkpoint import save_hf_model

    final = run_dir / folder
    whole = unsharded_copy(model, lora, info)
    if whole is not None:
        if lora.enabled:
            from alignkit.model.lora import merge_lora, save_adapter

            recorded, note = adapter_base(base_model, run_dir / adapter_folder, merged=final)
            save_adapter(whole, run_dir / adapter_folder, base_model_name_or_path=recorded)
            if note:
                (run_dir / adapter_folder / "README.md").write_text(f"# LoRA adapter\n\n{note}\n")
                logger.info(note)
            if whole is model:
                whole = copy.deepcopy(model)
            merge_lora(whole)
        save_hf_model(whole, final, tokenizer=tokenizer)  # type: ignore[arg-type]
    dist.barrier()
    return final


def adapter_base(base_model: str | None, adapter_dir: Path, *, merged: Path) -> tuple[str, str | None]:
    """What a LoRA adapter records as `base_model_name_or_path`, and a note on attaching it where peft cannot load
    that base. An HF directory (or an alignkit run's exported model) is recorded by its absolute path, which peft's
    `AutoPeftModelForCausalLM` loads from any working directory; a Hub name as given. A .gguf file or a packaged
    model name (smollm2-135m-instruct) is recorded as given too, since no path would load in peft, and the note
    (also the adapter's README.md) says how to attach it: `alignkit convert` the base to an HF directory, which
    dequantises it exactly as training loaded it."""
    from alignkit.checkpoint import resolve_model_path
    from alignkit.errors import CheckpointError

    if not base_model:
        return "", None
    try:
        resolved = resolve_model_path(base_model)
    except CheckpointError:
        return base_model, None  # a Hub name: peft fetches it as transformers does
    if resolved.is_dir():
        return str(resolved.resolve()), None
    what = "a GGUF file" if Path(base_model).is_file() else f"a packaged model ({resolved.name})"
    note = (
        f"The adapter in {adapter_dir} was trained on {base_model}, {what}, which peft cannot load as a base. To use "
        f"it with peft, convert the base to an HF directory with `alignkit convert {base_model} base-hf` and attach "
        f"it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"base-hf\"), \"{adapter_dir}\") (or "
        f"set base_model_name_or_path in its adapter_config.json to that directory for AutoPeftModelForCausalLM). "
        f"{merged} holds the model with the adapter merged in."
    )
    return base_model, note


def unsharded_copy(model: nn.Module, lora: LoRASection, info: DistInfo) -> nn.Module | None:
    """The model with whole tensors on rank 0 (None on the other ranks): the model itself, or under FSDP2 a new
    CPU copy built from the gathered shards (collective), with the same LoRA layers."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if info.is_main else None
    state = dist.full_state_dict(model)
    if not info.is_main:
        return None
    dtype = next(t.dtype for k, t in state.items() if "lora_" not in k)
    whole = type(model)(model.config).to(dtype)  # type: ignore[operator]
    add_lora(whole, lora)
    whole.load_state_dict(state)
    return whole
