"""Read dataset files into a list of records (dicts): JSONL (plain or gzip), JSON, Parquet, CSV, text, directories,
and Hugging Face `datasets` (a `save_to_disk` folder or a hub name).

Every reader reports a broken input as a `DataError` that names the file (and the line for JSONL), so a user can
fix the one bad line instead of guessing which of 50,000 records broke the run.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkit.errors import DataError

# Suffix -> reader name. Longest suffixes first, so ".jsonl.gz" wins over ".gz".
SUPPORTED_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv", ".txt")
TXT_MODES = ("file", "paragraphs", "lines")


def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    text_field: str = "text",
    txt_mode: str = "file",
) -> list[dict[str, Any]]:
    """Load every record of `source` as a dict.

    source: a `.jsonl` / `.jsonl.gz` / `.json` (a list, or `{"data": [...]}`) / `.json.gz` / `.parquet` / `.csv`
        (with a header row) / `.txt` file; a directory of such files (read in sorted name order; with `split`,
        only files whose name starts with it, e.g. `train.jsonl` for split="train"); a folder written by
        `datasets.Dataset.save_to_disk`; or a `datasets` hub name such as "tatsu-lab/alpaca".
    split: the split of a `datasets` DatasetDict / hub dataset (default "train"), or the file-name prefix in a
        directory. Ignored for a single file.
    text_field: the key that `.txt` records get.
    txt_mode: how a `.txt` file becomes records: "file" (one record with the whole text, for pretraining
        corpora), "paragraphs" (one per blank-line separated block) or "lines" (one per non-empty line).
    """
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode {txt_mode!r} is not one of {', '.join(TXT_MODES)}.")
    path = Path(source)
    if path.is_dir():
        if _is_hf_saved_dataset(path):
            return _load_hf_disk(path, split)
        return _load_directory(path, split=split, text_field=text_field, txt_mode=txt_mode)
    if path.is_file():
        return _load_file(path, text_field=text_field, txt_mode=txt_mode)
    if _looks_like_hub_name(str(source)):
        return _load_hf_hub(str(source), split)
    raise DataError(
        f"dataset {str(source)!r} does not exist: expected a file ({', '.join(SUPPORTED_SUFFIXES)}), "
        "a directory of such files, a datasets save_to_disk folder, or a hub name like 'owner/name'."
    )


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _load_file(path: Path, *, text_field: str, txt_mode: str) -> list[dict[str, Any]]:
    suffix = _suffix(path)
    if suffix is None:
        raise DataError(
            f"{path}: unknown data file type; supported: {', '.join(SUPPORTED_SUFFIXES)} "
            "(or a directory / datasets folder). Rename the file or convert it to JSONL."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; point the data path at a file with records.")
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path, gz=suffix.endswith(".gz"))
        if suffix in (".jsonl", ".jsonl.gz"):
            records = list(_parse_jsonl(text, path))
        elif suffix in (".json", ".json.gz"):
            records = _parse_json(text, path)
        elif suffix == ".csv":
            records = [dict(row) for row in csv.DictReader(io.StringIO(text))]
        else:
            records = _split_text(text, text_field=text_field, mode=txt_mode)
    if not records:
        raise DataError(f"{path} holds no records; point the data path at a file with records.")
    return records


def _read_text(path: Path, *, gz: bool) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it as {'gzip' if gz else 'a file'} ({err}).") from err
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig also accepts (and drops) a byte-order mark
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); re-encode it as UTF-8.") from err


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (.jsonl or .jsonl.gz), one per non-empty line; a bad line is a DataError naming
    the file and line. The one JSONL parser of the package: datasets, metrics files and tokenizer corpora use it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the path.")
    return list(_parse_jsonl(_read_text(path, gz=path.suffix == ".gz"), path))


def _parse_jsonl(text: str, path: Path) -> Iterator[dict[str, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: invalid JSON ({err}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{line_no}: each line must be a JSON object, got {type(record).__name__}; "
                "fix or remove that line"
            )
        yield record


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: a JSONL file with a .json name
            return list(_parse_jsonl(text, path))
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(data).__name__}.")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: record {index} is a {type(record).__name__}, not a JSON object; every record must be an object."
            )
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from err
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: cannot read it as Parquet ({err}).") from err


def _split_text(text: str, *, text_field: str, mode: str) -> list[dict[str, Any]]:
    if mode == "file":
        return [{text_field: text}] if text.strip() else []
    if mode == "lines":
        return [{text_field: line} for line in text.splitlines() if line.strip()]
    blocks = (block.strip("\n") for block in text.replace("\r\n", "\n").split("\n\n"))
    return [{text_field: block} for block in blocks if block.strip()]


def _load_directory(path: Path, *, split: str | None, text_field: str, txt_mode: str) -> list[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) is not None)
    if split is not None:
        files = [p for p in files if p.name.startswith(split)]
    if not files:
        which = f" whose name starts with {split!r}" if split is not None else ""
        raise DataError(
            f"directory {path} has no data files{which}; supported: {', '.join(SUPPORTED_SUFFIXES)}."
        )
    records: list[dict[str, Any]] = []
    for file in files:
        records.extend(_load_file(file, text_field=text_field, txt_mode=txt_mode))
    return records


def _is_hf_saved_dataset(path: Path) -> bool:
    # `Dataset.save_to_disk` writes dataset_info.json + state.json; `DatasetDict.save_to_disk` dataset_dict.json.
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{what} needs the `datasets` package; pip install datasets") from err
    return datasets


def _load_hf_disk(path: Path, split: str | None) -> list[dict[str, Any]]:
    datasets = _import_datasets(f"reading the datasets folder {path}")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise DataError(f"{path} has splits {sorted(data)}, not {split!r}; set the split to one of them.")
        data = data[split]
    return data.to_list()


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and _suffix(Path(source)) is None and not source.startswith(".")


def _load_hf_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    datasets = _import_datasets(f"loading the hub dataset {name!r}")
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, or no such split: all land here with various types
        raise DataError(
            f"could not load {name!r} as a local path or a datasets hub dataset ({type(err).__name__}: {err}); "
            "check the path, or the name and your network connection."
        ) from err
    return data.to_list()
