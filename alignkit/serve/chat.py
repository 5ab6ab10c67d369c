"""`alignkit chat --model M`: a terminal chat that streams the answer as it is generated.

Each user line is added to the conversation, the whole conversation goes through the tokenizer's chat template
(with the generation prompt), and the reply streams from the `Scheduler`'s token events. Commands: `/reset` clears
the history (the `--system` message stays), `/exit` or end of input quits. Only the replies go to stdout; the
prompt marker (on a terminal only) and notes go to stderr, so a piped session's stdout is just the answers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from alignkit.errors import UserError
from alignkit.generation.cli import add_model_arguments, add_sampling_arguments, load_model, sampling_params
from alignkit.generation.sampling import SamplingParams
from alignkit.generation.scheduler import Scheduler

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def add_chat_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal, answers streamed as they are generated",
        description="A terminal chat: type a message, the answer streams to stdout. The conversation is kept "
        "(through the tokenizer's chat template) until /reset; /exit or end of input (Ctrl-D) quits, Ctrl-C stops "
        "an answer.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", help="system message at the start of every conversation")
    add_sampling_arguments(parser, max_new_tokens=512,
                           seed_help="sampling seed; answer k of a session uses seed + k (default: random)")
    parser.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    model, tokenizer = load_model(args.model, args.dtype, purpose="chat needs one for the chat template")
    logger.info("/reset clears the conversation, /exit quits")
    chat(model, tokenizer, params, system=args.system, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    return 0


def chat(
    model: LlamaForCausalLM, tokenizer: Tokenizer, params: SamplingParams, *, system: str | None = None,
    stdin: TextIO, stdout: TextIO, stderr: TextIO,
) -> list[dict[str, str]]:
    """Read user lines from `stdin` until /exit or its end, stream each answer to `stdout`; return the conversation
    as it stands at the end."""
    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    # The weights stay packed between answers: the chat owns the model, and repacking would delay every answer.
    with Scheduler(model, tokenizer, max_batch_size=1, release_when_idle=False) as scheduler:
        _converse(scheduler, model, tokenizer, params, messages, start, stdin, stdout, stderr)
    return messages


def _converse(scheduler: Scheduler, model: LlamaForCausalLM, tokenizer: Tokenizer, params: SamplingParams,
              messages: list[dict[str, str]], start: list[dict[str, str]], stdin: TextIO, stdout: TextIO,
              stderr: TextIO) -> None:
    """The read-answer loop of `chat`; updates `messages` in place."""
    interactive = stdin.isatty()
    turn = 0
    while True:
        if interactive:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages[:] = start
            stderr.write("(conversation cleared)\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": text})
        prompt = _fit_prompt(tokenizer, messages, model.config.max_position_embeddings, len(start), stderr)
        if prompt is None:
            messages.pop()
            continue
        turn_params = replace(params, seed=params.seed + turn) if params.seed is not None else params
        reply = stream_reply(scheduler, prompt, turn_params, stdout, stderr)
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def _fit_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]], context: int, keep: int,
                stderr: TextIO) -> list[int] | None:
    """The conversation's prompt ids; when it leaves no room for an answer, the oldest exchanges after the first
    `keep` (system) messages are dropped from `messages` (in place) until it does. None if the last message alone
    is too long."""
    while True:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
        if len(prompt) < context:
            return prompt
        if len(messages) - keep <= 1:
            stderr.write(f"(that message takes {len(prompt)} tokens with the template; the model's context window "
                         f"is {context}: write a shorter one)\n")
            return None
        del messages[keep : keep + 2]  # the oldest user message and its answer
        stderr.write("(the conversation outgrew the context window: the oldest exchange was dropped)\n")


def stream_reply(scheduler: Scheduler, prompt: list[int], params: SamplingParams, stdout: TextIO,
                 stderr: TextIO) -> str:
    """Generate one answer, writing its text to `stdout` as it streams; Ctrl-C stops it. Returns the answer."""
    try:
        request_id = scheduler.add(prompt, params)
    except UserError as e:
        stderr.write(f"({e})\n")
        return ""
    pieces: list[str] = []
    try:
        while scheduler.has_work():
            for event in scheduler.step():
                if event.text:
                    pieces.append(event.text)
                    stdout.write(event.text)
                    stdout.flush()
    except KeyboardInterrupt:
        scheduler.cancel(request_id)
        while scheduler.has_work():
            scheduler.step()
        stderr.write("\n(stopped)")
    stdout.write("\n")
    stdout.flush()
    return "".join(pieces)
