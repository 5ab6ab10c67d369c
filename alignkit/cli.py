"""`alignkit <command>`: each command lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys

from alignkit.errors import UserError

# command name -> module with `add_<name>_command(subparsers)`; that function sets `func` on its parser.
COMMANDS: dict[str, str] = {
    "quickstart": "alignkit.quickstart",
    "train": "alignkit.trainers.cli",
    "generate": "alignkit.generation.cli",
    "sample": "alignkit.rollout.cli",
    "convert": "alignkit.checkpoint.cli",
    "info": "alignkit.checkpoint.cli",
    "merge": "alignkit.checkpoint.cli",
    "tokenizer": "alignkit.tokenizer.cli",
    "score": "alignkit.rewards.cli",
    "eval": "alignkit.eval.cli",
    "winrate": "alignkit.eval.cli",
    "serve": "alignkit.serve.server",
    "chat": "alignkit.serve.chat",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit", description="Train and align Llama-family language models, from pretraining to RLHF."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # command not built yet
            raise
        getattr(module, f"add_{name}_command")(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes each record to whatever sys.stderr is at that moment (a redirected or captured stream), not the one
    that existed when the handler was made."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def show_logs() -> None:
    """Print the package's diagnostics (the `alignkit` loggers: data statistics, resume notes, warnings) on stderr.

    The one channel for diagnostics: library code logs, the command line shows it; a program that imports alignkit
    configures `logging` as it likes."""
    logger = logging.getLogger("alignkit")
    if not any(getattr(h, "alignkit_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.alignkit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    show_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at interpreter exit
    except (UserError, FileNotFoundError) as e:
        # Errors raised for bad user input carry full sentences; print them without a traceback.
        print(f"alignkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`alignkit info ... | head`): stop quietly, as a command killed by SIGPIPE does.
        _silence_stdout()
        return SIGPIPE_EXIT
    return int(result or 0)


# What a shell reports for a command killed by SIGPIPE (128 + 13).
SIGPIPE_EXIT = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at interpreter exit does not raise BrokenPipeError again (the
    recipe of Python's `signal` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (captured in a test): there is nothing left to flush


if __name__ == "__main__":
    sys.exit(main())
