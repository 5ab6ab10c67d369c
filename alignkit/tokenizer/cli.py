"""`alignkit tokenizer train`: train a byte-level BPE tokenizer with chat tokens from .txt / .jsonl files."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from alignkit.data.readers import read_jsonl
from alignkit.errors import DataError
from alignkit.tokenizer.templates import TEMPLATES


def add_tokenizer_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tokenizer", help="Train a byte-level BPE tokenizer with a chat template's special tokens (`tokenizer train`).")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="<subcommand>", required=True)
    train = sub.add_parser(
        "train",
        help="Train a byte-level BPE tokenizer whose special tokens fit a chat template.",
        description="Train a byte-level BPE tokenizer on .txt files (one example per line) or .jsonl files (a "
        "`text` field per line) and save it as tokenizer.json + tokenizer_config.json.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl training files")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--template", choices=sorted(TEMPLATES), default="chatml", help="chat format (default chatml)")
    train.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                       help="an extra special token (repeatable)")
    train.add_argument("--output", required=True, help="directory to write the tokenizer to")
    train.set_defaults(func=run_train)


def read_texts(paths: Sequence[str]) -> Iterator[str]:
    """Lines of .txt files, and the `text` field of each line of .jsonl files."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"Training file {path} does not exist.")
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"Training file {path} is neither .txt nor .jsonl; convert it to one of those.")
        if path.suffix == ".txt":
            with path.open(encoding="utf-8") as handle:
                yield from handle
            continue
        for line_number, record in enumerate(read_jsonl(path), start=1):
            text = record.get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}: record {line_number} has no string `text` field; each line needs one.")
            yield text


def run_train(args: argparse.Namespace) -> int:
    from alignkit.tokenizer.train import train_bpe

    for name in args.input:  # fail before training starts, not halfway through the files
        if not Path(name).is_file():
            raise DataError(f"Training file {name} does not exist.")
    tokenizer = train_bpe(
        read_texts(args.input), vocab_size=args.vocab_size, special_tokens=args.special_token or None,
        template=args.template,
    )
    tokenizer.save(args.output)
    print(f"Saved a {tokenizer.vocab_size}-token {args.template} tokenizer to {args.output} "
          f"(eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}).")
    return 0
