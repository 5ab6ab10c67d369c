"""Readers: every supported file type, and errors that name the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignkit.data import load_records
from alignkit.errors import DataError

RECORDS = [{"instruction": "Say hi", "input": "", "output": "Hi!"}, {"instruction": "Add", "input": "1+1", "output": "2"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    assert load_records(path) == RECORDS


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n{\"instruction\": \"x\",\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON .*fix or remove that line"):
        load_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl:2: each line must be a JSON object"):
        load_records(path)


def test_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    assert load_records(path) == RECORDS


def test_json_list_and_data_key(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "b.json").write_text(json.dumps({"data": RECORDS}))
    assert load_records(tmp_path / "a.json") == RECORDS
    assert load_records(tmp_path / "b.json") == RECORDS


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", RECORDS)
    assert load_records(path) == RECORDS


def test_empty_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_records(path)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl holds no records"):
        load_records(blank)


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"data\.xml: unknown data file type; supported: \.jsonl\.gz, .*\.parquet"):
        load_records(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


def test_txt_modes(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("First para\nline two\n\nSecond para\n\n\nThird\n")
    assert load_records(path) == [{"text": "First para\nline two\n\nSecond para\n\n\nThird\n"}]
    assert load_records(path, txt_mode="paragraphs", text_field="body") == [
        {"body": "First para\nline two"}, {"body": "Second para"}, {"body": "Third"},
    ]
    assert [r["text"] for r in load_records(path, txt_mode="lines")] == ["First para", "line two", "Second para", "Third"]


def test_directory_and_split_prefix(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", RECORDS[:1])
    write_jsonl(tmp_path / "test.jsonl", RECORDS[1:])
    (tmp_path / "notes.md").write_text("ignored")
    assert load_records(tmp_path) == [RECORDS[1], RECORDS[0]]  # sorted file names: test, train
    assert load_records(tmp_path, split="train") == RECORDS[:1]
    with pytest.raises(DataError, match="no data files whose name starts with 'valid'"):
        load_records(tmp_path, split="valid")


def test_parquet(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert load_records(path) == RECORDS


def test_csv_with_header(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"What is 1+1?",2\n')
    assert load_records(path) == [{"question": "What is 1+1?", "answer": "2"}]


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single") == RECORDS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:1]), "test": datasets.Dataset.from_list(RECORDS[1:])}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", split="test") == RECORDS[1:]
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'valid'"):
        load_records(tmp_path / "dd", split="valid")


def test_real_hh_rlhf_gzip(shared_data: Path) -> None:
    records = load_records(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    assert len(records) == 2354  # the count the data README states
    assert all(r["chosen"].startswith("\n\nHuman:") for r in records)


def test_real_alpaca_json_list(shared_data: Path) -> None:
    records = load_records(shared_data / "alpaca" / "alpaca_train_2k.json")
    assert len(records) == 2000 and set(records[0]) == {"instruction", "input", "output"}


def test_missing_optional_packages_give_install_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d\.parquet: reading Parquet needs pyarrow; pip install pyarrow"):
        load_records(path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"loading the hub dataset 'someone/some-data' needs the `datasets` package"):
        load_records("someone/some-data")
