"""Give an HF model directory that holds only config.json and tokenizer files random weights (model.safetensors).

    python -m alignkit.cli convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf   # once, where the GGUF is
    rm smollm2-hf/model.safetensors                                              # keep the 4 small files
    python bench/make_random_smollm2.py smollm2-hf                               # where the benchmarks run

The result has SmolLM2-135M's architecture and tokenizer with seeded random weights (alignkit's `init_weights`),
stored in fp32 like `alignkit convert` stores them, so `--hf-dir` benchmarks can run where the GGUF is not
installed: throughput and memory do not depend on the weights' values (losses and generated text do). Only
model.safetensors is written; config.json and the tokenizer files are left as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from alignkit.model import LlamaForCausalLM, ModelConfig  # noqa: E402


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The state dict HF expects (no lm_head.weight when it is tied to the embeddings), seeded."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.init_weights()
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # a tied weight is listed once
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="folder with config.json, tokenizer.json and tokenizer_config.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model.safetensors")
    args = parser.parse_args()
    directory = Path(args.directory)
    missing = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (directory / n).is_file()]
    if missing:
        raise SystemExit(f"{directory}: {', '.join(missing)} missing; convert the SmolLM2 GGUF once with "
                         "`python -m alignkit.cli convert <gguf> <dir>` and keep its config and tokenizer files.")
    target = directory / "model.safetensors"
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{target} exists (real weights?); pass --overwrite to replace it with random weights.")
    if any(directory.glob("model-*.safetensors")):
        raise SystemExit(f"{directory} holds a sharded checkpoint; use a folder with config and tokenizer files only.")
    config = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()), source=str(directory / "config.json"))
    start = time.perf_counter()
    state = random_weights(config, args.seed)
    save_file(state, str(target), metadata={"format": "pt"})  # transformers checks the "format" key
    size = sum(t.numel() for t in state.values())
    print(f"wrote {target}: {size:,} random parameters (seed {args.seed}, fp32) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
