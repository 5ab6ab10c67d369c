"""MMLU (Hendrycks et al., 2021, https://arxiv.org/abs/2009.03300) as `alignkit eval` tasks: one task per subject,
scored on its test (or val) split, with the subject's dev split as the shots, in lm-evaluation-harness's format.

The data are the standard MMLU CSV files, without a header row, under `<data folder>/mmlu/`:

    dev/<subject>_dev.csv     5 questions per subject: the shots
    val/<subject>_val.csv     1,531 questions in all
    test/<subject>_test.csv   14,042 questions in all (scored by default)

each row `question,A,B,C,D,answer` with the answer one of A-D. Task names:

| name                      | what                                                    |
|---------------------------|---------------------------------------------------------|
| `mmlu`                    | every subject of `test/`, and their macro average (`mmlu` group) |
| `mmlu:val`                | the same on `val/` (task names end in `:val`)           |
| `mmlu_<subject>`          | one subject, e.g. `mmlu_college_physics` (`:val` also works) |

Prompt (lm-evaluation-harness `lm_eval/tasks/mmlu/default/_default_template_yaml` and `_generate_configs.py`):
the description `"The following are multiple choice questions (with answers) about <subject, underscores as
spaces>.\\n\\n"`, then k dev questions solved (`<query> <letter>` + `"\\n\\n"` each, the first k rows in file order,
its `first_n` sampler), then the item's query

    <question, stripped>\\nA. <A>\\nB. <B>\\nC. <C>\\nD. <D>\\nAnswer:

and the four continuations `" A"`, `" B"`, `" C"`, `" D"`. The metric is `acc` alone (lm-evaluation-harness's
MMLU reports no `acc_norm`: with one-letter choices it equals `acc`).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from alignkit.errors import ConfigError, DataError
from alignkit.eval.tasks import Doc, Task, data_folder

logger = logging.getLogger(__name__)

MMLU_FOLDER = "mmlu"
SPLITS = ("val", "test")  # scored splits; dev is the shots
DEFAULT_SPLIT = "test"
NUM_SUBJECTS = 57
LETTERS = ("A", "B", "C", "D")

# `mmlu`, `mmlu:val`, `mmlu_<subject>`, `mmlu_<subject>:test`.
_SPEC = re.compile(r"mmlu(?:_(?P<subject>[a-z0-9_]+))?(?::(?P<split>[a-z]+))?")


def is_mmlu_spec(spec: str) -> bool:
    """Whether a --tasks entry names MMLU (all subjects or one), with or without a split."""
    return _SPEC.fullmatch(spec) is not None


def description(subject: str) -> str:
    """The line that opens every prompt of `subject` (lm-evaluation-harness's `description`)."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def query(question: str, choices: tuple[str, ...]) -> str:
    """An item's context: the question (stripped, as lm-evaluation-harness's `question.strip()`), the four
    lettered choices (not stripped) and "Answer:"."""
    lines = [question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)), "Answer:"]
    return "\n".join(lines)


def read_split_file(path: Path) -> list[Doc]:
    """The rows of one MMLU CSV file as Docs (`line` is the row's first line: a question may span lines); a
    DataError naming file and line for a row that is not `question,A,B,C,D,answer`."""
    docs: list[Doc] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next_line = 1  # the line the next row starts on
        while True:
            where = f"{path}:{next_line}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise DataError(f"{where}: not valid CSV ({error}); MMLU rows are question,A,B,C,D,answer, "
                                "with fields that contain commas or quotes in double quotes.") from None
            line, next_line = next_line, reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{where}: an MMLU row needs 6 fields (question, A, B, C, D, answer); this one has "
                                f"{len(row)}: {','.join(row)[:80]!r}. Quote fields that contain commas.")
            answer = row[5].strip()
            if answer not in LETTERS:
                hint = " The files have no header row." if not docs else ""
                raise DataError(f"{where}: the answer is {row[5]!r}; it must be one of A, B, C, D.{hint}")
            docs.append(Doc(index=len(docs), line=line, contexts=(query(row[0], tuple(row[1:5])),),
                            continuations=LETTERS, gold=LETTERS.index(answer)))
    if not docs:
        raise DataError(f"{path}: the file has no questions.")
    return docs


def mmlu_folder(data_dir: str | Path | None) -> Path:
    """<data folder>/mmlu; a ConfigError saying where it was looked for when it is missing."""
    root = Path(data_dir) if data_dir is not None else data_folder()
    if root is None or not (root / MMLU_FOLDER).is_dir():
        where = f"{root / MMLU_FOLDER} does not exist" if root is not None else "no shared data folder was found"
        raise ConfigError(f"MMLU needs the standard MMLU CSVs in <data folder>/{MMLU_FOLDER}/{{dev,val,test}}/; "
                          f"{where}. Set ALIGNKIT_SHARED_DATA or pass --data-dir.")
    return root / MMLU_FOLDER


def subjects(folder: Path, split: str) -> list[str]:
    """The subjects that have a file in `folder/split`, sorted; a DataError when the split folder is missing."""
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: the MMLU {split} split folder is missing; it should hold "
                        f"<subject>_{split}.csv files (the standard MMLU CSVs).")
    found = sorted(p.name.removesuffix(f"_{split}.csv") for p in split_dir.glob(f"*_{split}.csv"))
    if not found:
        raise DataError(f"{split_dir}: no <subject>_{split}.csv files in the MMLU {split} split folder.")
    return found


def load_mmlu(spec: str, data_dir: str | Path | None = None) -> list[Task]:
    """The tasks of an MMLU name (see the module docstring): one per subject, sorted by subject; every file read
    and checked."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"{spec!r} is not an MMLU task name; use mmlu, mmlu:val, mmlu_<subject> or "
                          "mmlu_<subject>:val.")
    split = match["split"] or DEFAULT_SPLIT
    if split not in SPLITS:
        raise ConfigError(f"{spec!r}: unknown MMLU split {split!r}; score test (the default) or val "
                          "(dev holds the shots).")
    folder = mmlu_folder(data_dir)
    known = subjects(folder, split)
    if match["subject"] is None:
        chosen = known
        if len(known) != NUM_SUBJECTS:
            logger.warning(f"{folder / split} holds {len(known)} subjects, not MMLU's {NUM_SUBJECTS}; the mmlu "
                           "average is over those.")
    elif match["subject"] in known:
        chosen = [match["subject"]]
    else:
        raise ConfigError(f"unknown MMLU subject {match['subject']!r} (task {spec!r}); the subjects in "
                          f"{folder / split}: {', '.join(known)}.")
    suffix = f":{split}" if split != DEFAULT_SPLIT else ""
    group = f"mmlu{suffix}"
    tasks = []
    for subject in chosen:
        dev_path = folder / "dev" / f"{subject}_dev.csv"
        if not dev_path.is_file():
            raise DataError(f"{dev_path}: the dev file of MMLU subject {subject!r} is missing; it holds the shots "
                            f"(the MMLU dev split folder is {folder / 'dev'}).")
        path = folder / split / f"{subject}_{split}.csv"
        tasks.append(Task(
            name=f"mmlu_{subject}{suffix}", path=path, layout="choices", docs=read_split_file(path),
            fewshot_docs=read_split_file(dev_path), fewshot_path=dev_path, description=description(subject),
            group=group, acc_norm=False,
        ))
    return tasks
