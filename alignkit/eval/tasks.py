"""Few-shot (in-context) evaluation tasks: JSONL layouts, loading and checks, the shot pool, and prompts.

A task is a JSONL file in one of three layouts, recognised by its fields (no code per task):

| layout         | fields                                   | scored                                          |
|----------------|------------------------------------------|-------------------------------------------------|
| `choices`      | `query`, `choices` (list), `gold` (int)  | each choice after the query (ARC, BoolQ, PIQA, ...) |
| `partial`      | `context_options` (list), `continuation`, `gold` | the shared continuation after each option (Winogrande's partial scoring) |
| `continuation` | `context`, `continuation`                | the continuation after the context (LAMBADA's last word) |

Prompts follow lm-evaluation-harness's plain-text (no chat template) format with its defaults
`target_delimiter=" "` and `fewshot_delimiter="\\n\\n"`:

    k-shot context = shot_1 + "\\n\\n" + ... + shot_k + "\\n\\n" + the item's context
    shot           = its context + " " + its gold continuation

and each choice is the continuation `" " + choice` of that context. The shots are the first K records of the file
(the shot pool, K = the largest shot count unless set), never scored, taken in file order: the prompts
lm-evaluation-harness builds with its `first_n` sampler when the pool is its few-shot split. docs/evaluation.md
lists what matches and what differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from alignkit.data.readers import read_jsonl
from alignkit.errors import ConfigError, DataError

# lm-evaluation-harness's defaults: between a context and its target, and between few-shot examples.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# Known task names resolve to <data folder>/icl_eval/<name>.jsonl.
TASK_FOLDER = "icl_eval"

Layout = Literal["choices", "partial", "continuation"]

# layout -> the fields that identify it (a record may carry more; they are ignored).
LAYOUT_FIELDS: dict[Layout, tuple[str, ...]] = {
    "choices": ("query", "choices", "gold"),
    "partial": ("context_options", "continuation", "gold"),
    "continuation": ("context", "continuation"),
}


@dataclass(frozen=True)
class Doc:
    """One record of a task, in the form every layout shares: a context per choice and a continuation per choice.

    - `choices`: one context (the query) and one continuation per choice;
    - `partial`: one context per option and the same continuation for each;
    - `continuation`: one context and one continuation, no gold (the continuation is the answer).
    """

    index: int  # 0-based position among the file's records
    line: int  # 1-based line in the file
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int | None

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def context(self, choice: int) -> str:
        return self.contexts[choice if len(self.contexts) > 1 else 0]

    def continuation(self, choice: int) -> str:
        return self.continuations[choice if len(self.continuations) > 1 else 0]

    def shot(self) -> str:
        """This record as a solved few-shot example: its gold context, the delimiter, its gold continuation."""
        answer = self.gold or 0
        return self.context(answer) + TARGET_DELIMITER + self.continuation(answer)


@dataclass
class Task:
    """A task file read and checked: its name, path, layout and records in file order.

    Most tasks are one file whose first records are the shots. A task with a few-shot split of its own (MMLU, whose
    shots are a subject's dev questions: `alignkit.eval.mmlu`) sets `fewshot_docs`; then every record is scored.
    """

    name: str
    path: Path
    layout: Layout
    docs: list[Doc]
    fewshot_docs: list[Doc] | None = None  # the shots when they come from a split of their own
    fewshot_path: Path | None = None  # the file they were read from
    description: str = ""  # opens every prompt, before the shots (lm-evaluation-harness's `description`)
    group: str | None = None  # the group whose average this task is part of ("mmlu" for an MMLU subject)
    acc_norm: bool = True  # report acc_norm (`choices` layout); MMLU's one-letter choices make it equal acc

    def split(self, shot_pool: int) -> tuple[list[Doc], list[Doc]]:
        """(shot pool, scored records): the first `shot_pool` records are the pool, never scored; with a few-shot
        split of its own, (that split, every record) whatever `shot_pool` is."""
        if self.fewshot_docs is not None:
            return self.fewshot_docs, self.docs
        return split_shot_pool(self.docs, shot_pool, self.path)

    def describe(self) -> dict[str, Any]:
        """What results.json records of the task: path, layout, size; the few-shot file and group when set."""
        info: dict[str, Any] = {"path": str(self.path), "layout": self.layout, "num_records": len(self.docs)}
        if self.fewshot_docs is not None:
            info |= {"fewshot_path": str(self.fewshot_path), "fewshot_records": len(self.fewshot_docs)}
        if self.group is not None:
            info["group"] = self.group
        return info


D = TypeVar("D")


def split_shot_pool(docs: Sequence[D], shot_pool: int, path: Path) -> tuple[list[D], list[D]]:
    """(the first `shot_pool` records, the rest): a task's shots and the records it scores; a ConfigError when the
    pool is negative or leaves nothing to score."""
    if shot_pool < 0:
        raise ConfigError(f"the shot pool must hold 0 or more records; got {shot_pool}.")
    if shot_pool >= len(docs):
        raise ConfigError(
            f"{path}: the shot pool of {shot_pool} records leaves nothing to score: the file has "
            f"{len(docs)} records. Use fewer shots (or a smaller --shot-pool)."
        )
    return list(docs[:shot_pool]), list(docs[shot_pool:])


def fewshot_prefix(pool: Sequence[Doc], num_shots: int) -> str:
    """The first `num_shots` pool records as solved examples, each followed by the few-shot delimiter."""
    if num_shots > len(pool):
        raise ConfigError(
            f"{num_shots} shots need {num_shots} examples, but the shot pool holds {len(pool)}; raise --shot-pool "
            f"to at least {num_shots} or ask for fewer shots."
        )
    return "".join(doc.shot() + FEWSHOT_DELIMITER for doc in pool[:num_shots])


def build_requests(doc: Doc, prefix: str) -> list[tuple[str, str]]:
    """(context, continuation) strings to score for each choice of `doc` after the few-shot `prefix`."""
    return [(prefix + doc.context(i), TARGET_DELIMITER + doc.continuation(i)) for i in range(doc.num_choices)]


# ---------------------------------------------------------------------------------------------- loading


def data_folder() -> Path | None:
    """The shared data folder: $ALIGNKIT_SHARED_DATA, else ../shared/data from the working directory, else the
    folder beside the repository that holds this package; None when none exists."""
    candidates = []
    if os.environ.get("ALIGNKIT_SHARED_DATA"):
        candidates.append(Path(os.environ["ALIGNKIT_SHARED_DATA"]))
    candidates += [Path("..") / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def known_tasks(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Task name -> file, for every JSONL file in <data folder>/icl_eval."""
    root = Path(data_dir) if data_dir is not None else data_folder()
    folder = root / TASK_FOLDER if root is not None else None
    if folder is None or not folder.is_dir():
        return {}
    return {p.name.removesuffix(".jsonl"): p for p in sorted(folder.glob("*.jsonl"))}


def resolve_task(spec: str, data_dir: str | Path | None = None) -> tuple[str, Path]:
    """(name, path) of a task given as a JSONL path or a known name; a ConfigError that lists the known names."""
    path = Path(spec)
    if path.is_file():
        return path.name.removesuffix(".gz").removesuffix(".jsonl"), path
    known = known_tasks(data_dir)
    if spec in known:
        return spec, known[spec]
    if path.suffix in (".jsonl", ".gz") or "/" in spec or os.sep in spec:
        raise DataError(f"task file {spec} does not exist; check the path.")
    where = data_dir if data_dir is not None else data_folder()
    if known:
        raise ConfigError(f"unknown task {spec!r}; known tasks (in {Path(where or '.') / TASK_FOLDER}): "
                          f"{', '.join(known)} (and mmlu, mmlu_<subject> from the data folder's mmlu/); or pass the path "
                          "of a JSONL file.")
    raise ConfigError(
        f"unknown task {spec!r}, and no task folder was found ({TASK_FOLDER}/ in the shared data folder: set "
        "ALIGNKIT_SHARED_DATA or --data-dir); pass the path of a JSONL file."
    )


def load_tasks(spec: str, data_dir: str | Path | None = None) -> list[Task]:
    """The tasks one --tasks entry names: an MMLU name (`mmlu`, `mmlu:val`, `mmlu_<subject>`: one task per
    subject) or, as `load_task`, a JSONL path or a known file name."""
    # Imported here: alignkit.eval.mmlu builds its tasks from this module's Doc and Task.
    from alignkit.eval.mmlu import is_mmlu_spec, load_mmlu

    if is_mmlu_spec(spec) and not Path(spec).is_file() and spec not in known_tasks(data_dir):
        return load_mmlu(spec, data_dir)
    return [load_task(spec, data_dir)]


def load_task(spec: str, data_dir: str | Path | None = None) -> Task:
    """Read and check a task (a JSONL path or a known name): every record must fit the layout of the first."""
    name, path = resolve_task(spec, data_dir)
    records = read_jsonl(path)  # a bad JSON line is a DataError naming file and line
    if not records:
        raise DataError(f"{path}: the task file has no records.")
    # read_jsonl skips blank lines; the records' own line numbers, for errors about their fields.
    text = path.read_text(encoding="utf-8") if path.suffix != ".gz" else None
    lines = ([n for n, line in enumerate(text.splitlines(), start=1) if line.strip()] if text is not None
             else list(range(1, len(records) + 1)))
    layout = detect_layout(records[0], f"{path}:{lines[0]}")
    docs = [parse_record(record, layout, index=i, line=lines[i], where=f"{path}:{lines[i]}")
            for i, record in enumerate(records)]
    return Task(name=name, path=path, layout=layout, docs=docs)


def detect_layout(record: dict[str, Any], where: str) -> Layout:
    """The layout whose fields `record` carries (the first that fits, in the table's order)."""
    for layout, fields in LAYOUT_FIELDS.items():
        if all(f in record for f in fields):
            return layout
    expected = "; ".join("{" + ", ".join(f'"{f}"' for f in fields) + "}" for fields in LAYOUT_FIELDS.values())
    raise DataError(f"{where}: a task record needs one of these sets of fields: {expected}; "
                    f"this one has {sorted(record)}.")


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string; got {type(value).__name__} {value!r:.60}.")
    return value


def _texts(record: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {key!r} must be a list of strings; got {value!r:.80}.")
    if len(value) < 2:
        raise DataError(f"{where}: {key!r} has {len(value)} entries; a multiple-choice record needs at least two.")
    return tuple(value)


def _gold(record: dict[str, Any], num_choices: int, key: str, where: str) -> int:
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: 'gold' must be an integer index into {key!r}; got {gold!r}.")
    if not 0 <= gold < num_choices:
        raise DataError(f"{where}: 'gold' is {gold}, out of range for {num_choices} {key} (0 to {num_choices - 1}).")
    return gold


def parse_record(record: dict[str, Any], layout: Layout, *, index: int, line: int, where: str) -> Doc:
    """One record as a Doc; a DataError naming file, line and field when it does not fit `layout`."""
    missing = [f for f in LAYOUT_FIELDS[layout] if f not in record]
    if missing:
        raise DataError(f"{where}: missing {', '.join(repr(m) for m in missing)}; every record of a {layout!r} "
                        f"task needs {', '.join(LAYOUT_FIELDS[layout])} (like the file's first record).")
    if layout == "choices":
        choices = _texts(record, "choices", where)
        return Doc(index, line, (_text(record, "query", where),), choices,
                   _gold(record, len(choices), "choices", where))
    if layout == "partial":
        options = _texts(record, "context_options", where)
        return Doc(index, line, options, (_text(record, "continuation", where),),
                   _gold(record, len(options), "context_options", where))
    continuation = _text(record, "continuation", where)
    if not continuation:
        raise DataError(f"{where}: 'continuation' is empty; there is nothing to score.")
    return Doc(index, line, (_text(record, "context", where),), (continuation,), None)
