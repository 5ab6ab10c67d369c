"""Where a decode step's time goes: the step with one piece replaced by a no-op, against the whole step.

    python bench/decode_ablation.py                     # bf16, 8 rows, 130 cached tokens
    python bench/decode_ablation.py --dtype float32 --rows 32

A random model with SmolLM2-135M's shapes (30 layers, hidden 576, GQA 9/3, vocab 49,152), packed linear weights
as generation packs them, a left-padded batch (so the step carries an attention mask, as in `bench/generate.py`).
Each variant times --steps decode steps and prints the median; the difference from "whole" is what that piece
costs inside a real step (caches, allocator and dispatch included), which a profile of the op alone does not show.
The outputs of an ablated step are meaningless: this measures time only. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import alignkit.model.llama as llama
from alignkit.generation.packed import packed_linears
from alignkit.model import KVCache, LlamaForCausalLM, ModelConfig

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)

# name -> (module, attribute, no-op replacement)
ABLATIONS = {
    "attention": (F, "scaled_dot_product_attention", lambda q, k, v, **kw: q),
    "rmsnorm": (llama.RMSNorm, "forward", lambda self, x: x),
    "rope": (llama, "apply_rope", lambda x, cos, sin: x),
}


def step_ms(model: LlamaForCausalLM, rows: int, cached: int, steps: int, masked: bool) -> float:
    config, dtype = model.config, model.dtype
    cache = KVCache(config, batch_size=rows, max_length=cached + steps + 1, dtype=dtype)
    mask = torch.ones(rows, cached + steps + 1, dtype=torch.bool)
    mask[:, :3] = False  # three columns of left padding
    with torch.inference_mode(), packed_linears(model, batch_size=rows):
        model(torch.randint(0, config.vocab_size, (rows, cached)), kv_cache=cache, logits_to_keep=1,
              attention_mask=mask[:, :cached])
        token = torch.randint(0, config.vocab_size, (rows, 1))
        times = []
        for i in range(steps):
            step_mask = mask[:, : cache.length + 1] if masked else None
            start = time.perf_counter()
            model(token, position_ids=torch.full((rows, 1), cached + i), kv_cache=cache, logits_to_keep=1,
                  attention_mask=step_mask)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cached", type=int, default=130, help="tokens in the cache before the timed steps")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**SMOLLM2)).to(llama.DTYPES[args.dtype]).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.dtype}, {args.rows} rows, "
          f"{args.cached} cached tokens, median of {args.steps} steps")
    whole = step_ms(model, args.rows, args.cached, args.steps, masked=True)
    print(f"{'whole step':<22} {whole:7.2f} ms")
    print(f"{'without the mask':<22} {step_ms(model, args.rows, args.cached, args.steps, masked=False):7.2f} ms")
    for name, (owner, attribute, stub) in ABLATIONS.items():
        original = getattr(owner, attribute)
        setattr(owner, attribute, stub)
        try:
            ms = step_ms(model, args.rows, args.cached, args.steps, masked=True)
        finally:
            setattr(owner, attribute, original)
        print(f"{'without ' + name:<22} {ms:7.2f} ms   ({name}: {whole - ms:5.2f} ms of the step)")


if __name__ == "__main__":
    main()
