"""`alignkit score --model RM --prompt ... --response ...` prints the reward; `--input pairs.jsonl` scores a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  alignkit score --model runs/rm_smollm2_hh --prompt "How do I boil an egg?" --response "Put it in boiling water..."
  alignkit score --model runs/rm_smollm2_hh --input conversations.jsonl --output scores.txt

--input records (JSONL): {"prompt": "...", "response": "..."} (prompt may be a message list) or {"messages": [...]}.
One score per line is written, in input order.
"""


def add_score_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "score", help="score responses with a trained reward model",
        description="Print the reward a reward model (`alignkit train rm`) assigns to a response.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="reward model: an rm run directory or an HF directory")
    parser.add_argument("--prompt", help="the user's message (with --response)")
    parser.add_argument("--response", help="the assistant's response to score")
    parser.add_argument("--input", help="JSONL file of records to score (one score per line)")
    parser.add_argument("--output", help="write the scores here instead of stdout")
    parser.add_argument("--max-length", type=int, default=None, help="cut longer conversations from the left")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from alignkit.data import load_records
    from alignkit.errors import ConfigError
    from alignkit.rewards.scoring import load_reward_model, record_conversation, score_conversations

    single = args.prompt is not None or args.response is not None
    if single == (args.input is not None) or (single and (args.prompt is None or args.response is None)):
        raise ConfigError("Give either --prompt and --response (one score) or --input FILE.jsonl (one score per line).")
    model, tokenizer = load_reward_model(args.model, device=args.device)
    if single:
        conversations: list[tuple[Any, str | None]] = [(args.prompt, args.response)]
    else:
        records = load_records(args.input)
        conversations = [record_conversation(r, index=i, source=args.input) for i, r in enumerate(records)]
    scores = score_conversations(model, tokenizer, conversations, max_length=args.max_length,
                                 batch_size=args.batch_size)
    text = "".join(f"{s:.6f}\n" for s in scores)
    if args.output:
        Path(args.output).write_text(text)
        print(f"Wrote {len(scores)} scores to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
