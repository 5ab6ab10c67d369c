"""Docs as tests: every command and snippet of README.md, docs/**/*.md and the recipe headers runs as written.

`doccheck.py` has the collector, the `<!-- doctest: ... -->` conventions and the runner. Here:

- `test_page` runs each page's items in order in a fresh directory (smoke overrides where the page shows them,
  manual items only parsed) and fails on any item that fails; the session prints how many ran (conftest.py);
- `test_manual_run` (marker `manual`, skipped unless `--run-manual`) runs each manual command for real, as written,
  from the repository root;
- the remaining tests exercise the collector and runner on synthetic pages, so a doc that drifts is known to fail.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.docs import doccheck
from tests.docs.doccheck import Item, PageRunner, collect_markdown, collect_recipe_header, summarise

PAGES = doccheck.doc_files()
# Pages whose runnable items load SmolLM2-135M or train on real data: tens of seconds each.
SLOW_PAGES = {"README.md", "docs/generation.md", "docs/evaluation.md", "docs/recipes.md"}
RESULTS: dict[str, dict[str, int]] = {}  # page -> counts, printed at the end of the session (conftest.py)


def _rel(path: Path) -> str:
    return str(path.relative_to(doccheck.REPO_ROOT))


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A finished `alignkit quickstart --fast` run (about 20 s), made the first time a page's setup asks for it."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            out = tmp_path_factory.mktemp("quickstart") / "qs"
            subprocess.run([sys.executable, "-m", "alignkit.cli", "quickstart", "--fast", "--output", str(out)],
                           check=True, capture_output=True, env=PageRunner(out.parent).env, timeout=600)
            made.append(out)
        return made[0]

    return get


@pytest.mark.parametrize("page", [pytest.param(p, id=_rel(p), marks=[pytest.mark.slow] if _rel(p) in SLOW_PAGES else [])
                                  for p in PAGES])
def test_page(page: Path, tmp_path: Path, quickstart_run: Callable[[], Path]) -> None:
    items = doccheck.collect_file(page)
    workdir = tmp_path / "work"
    workdir.mkdir()
    outcomes = PageRunner(workdir, quickstart=quickstart_run).run_all(items)
    counts = summarise(outcomes)
    RESULTS[_rel(page)] = counts
    for o in outcomes:
        if o.status in {"failed", "skipped"} or o.item.kind != "inline":
            print(f"  {o.status:8} {o.item.source}: {o.item.text.splitlines()[0][:100]}"
                  + (f"  [{o.message.splitlines()[0][:100]}]" if o.message else ""))
    print(f"{_rel(page)}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    failures = [f"{o.item.source}: {o.item.text.splitlines()[0]}\n{o.message}" for o in outcomes if o.status == "failed"]
    assert not failures, "doc items that fail as written:\n\n" + "\n\n".join(failures)


def _manual_commands() -> list[object]:
    params = []
    for page in PAGES:
        try:
            items = doccheck.collect_file(page)
        except ValueError:
            continue  # test_page reports it
        for item in items:
            if item.kind == "command" and item.mode == "manual" and shlex.split(item.text)[0] not in {"pip", "export"}:
                params.append(pytest.param(item, id=f"{item.source}:{shlex.split(item.text)[:3]}",
                                           marks=pytest.mark.manual))
    return params


@pytest.mark.parametrize("item", _manual_commands())
def test_manual_run(item: Item) -> None:
    """The true long runs, as written, from the repository root (`pytest --run-manual -k ...` to pick one)."""
    missing = doccheck.missing_resources(item.needs | {"data"})
    if missing:
        pytest.skip("; ".join(missing))
    runner = PageRunner(doccheck.REPO_ROOT, link=False, timeout_s=24 * 3600)
    outcome = runner.run_item(Item("command", item.text, item.source, needs=item.needs))
    assert outcome.status in {"ran", "skipped"}, outcome.message


# ------------------------------------------------------------------------------------------------- the collector


SYNTHETIC = """# A page

Some prose with `alignkit train sft --help` and `alignkit generate --model M ...`.

<!-- doctest: skip installs a package -->
```bash
pip install something
```

```bash
export ALIGNKIT_SHARED_DATA=/path/to/shared/data
alignkit info runs/tiny \\
    --json  # a comment
python -m alignkit.tasks.word_problems --help && alignkit convert a b
```

<!-- doctest: smoke train: train.max_steps=2; generate: --max-new-tokens 4 needs=data -->
```
alignkit train sft -c recipe.yaml
```

```
y = x W^T     (math, not a command)
```

<!-- doctest: setup
echo hidden > made.txt
-->

```python
x = 1
```

```python
print(x + 1)
```

<!-- doctest: output -->
```
2
```
"""


def test_collector_finds_every_item_with_its_directives() -> None:
    items = collect_markdown(SYNTHETIC, "page.md")
    got = [(i.kind, i.mode, i.text) for i in items]
    assert got == [
        ("inline", "manual", "alignkit train sft --help"),
        ("inline", "manual", "alignkit generate --model M ..."),
        ("command", "skip", "pip install something"),
        ("command", "run", "export ALIGNKIT_SHARED_DATA=/path/to/shared/data"),
        ("command", "run", "alignkit info runs/tiny --json"),
        ("command", "run", "python -m alignkit.tasks.word_problems --help"),
        ("command", "run", "alignkit convert a b"),
        ("command", "run", "alignkit train sft -c recipe.yaml"),
        ("setup", "run", "echo hidden > made.txt\n"),
        ("python", "run", "x = 1\n"),
        ("python", "run", "print(x + 1)\n"),
        ("output", "run", "2\n"),
    ]
    assert items[2].reason == "installs a package"
    assert items[4].source == "page.md:12"
    train = items[7]
    assert train.needs == {"data"}
    assert doccheck.smoke_args(train.smoke, shlex.split(train.text)) == ["train.max_steps=2"]
    assert doccheck.smoke_args(train.smoke, ["alignkit", "generate"]) == ["--max-new-tokens", "4"]


def test_collector_rejects_a_stray_or_unknown_directive() -> None:
    with pytest.raises(ValueError, match="not right before a fenced block"):
        collect_markdown("<!-- doctest: skip x -->\nprose\n```bash\nalignkit info m\n```\n", "p.md")
    with pytest.raises(ValueError, match="unknown doctest directive 'skipp'"):
        collect_markdown("<!-- doctest: skipp x -->\n```bash\nalignkit info m\n```\n", "p.md")
    [item] = collect_markdown("```bash\nalignkit info m | head\n```\n", "p.md")
    assert item.kind == "error" and "shell operator '|'" in item.reason


def test_recipe_header_commands_are_manual() -> None:
    header = ("# A recipe.\n#   export ALIGNKIT_SHARED_DATA=/path/to/shared/data   # the folder\n"
              "#   alignkit train sft --config recipes/x.yaml\n#   python -m alignkit.tasks.word_problems \\\n"
              "#       --out runs/x\n# then `alignkit quickstart --fast`.\nmodel: {}\n# not the header\n")
    items = collect_recipe_header(header, "recipes/x.yaml")
    assert [(i.kind, i.mode, i.text) for i in items] == [
        ("command", "manual", "export ALIGNKIT_SHARED_DATA=/path/to/shared/data"),
        ("command", "manual", "alignkit train sft --config recipes/x.yaml"),
        ("command", "manual", "python -m alignkit.tasks.word_problems --out runs/x"),
        ("inline", "manual", "alignkit quickstart --fast"),
    ]


def test_output_matching() -> None:
    assert doccheck.output_matches("The capital is Paris.\n", "  The capital is Paris.  \n\n")
    assert doccheck.output_matches("loaded ... parameters\nok", "loaded 134,515,008 parameters\nok\n")
    assert not doccheck.output_matches("The capital is Paris.", "The capital is Lyon.")


# ------------------------------------------------------------------------------------------------- the runner


def _run_page(text: str, workdir: Path, quickstart: Callable[[], Path] | None = None) -> list[doccheck.Outcome]:
    workdir.mkdir(exist_ok=True)
    return PageRunner(workdir, quickstart=quickstart, timeout_s=300).run_all(collect_markdown(text, "synthetic.md"))


DOC_WITH_MODEL = """<!-- doctest: setup
mkdir -p runs && cp -r "$DOCTEST_QS/sft" runs/sft
-->

<!-- doctest: smoke --max-new-tokens 2 -->
```bash
alignkit generate --model runs/sft --prompt "1 + 1 ="
```
"""


@pytest.mark.slow
def test_runner_fails_a_doc_command_without_model(tmp_path: Path, quickstart_run: Callable[[], Path]) -> None:
    """The same page passes as written and fails once `--model` is removed from its command (the recipes.md bug)."""
    good = _run_page(DOC_WITH_MODEL, tmp_path / "good", quickstart_run)
    assert [o.status for o in good] == ["ran", "ran"], [o.message for o in good]
    assert summarise(good)["commands run"] == 1

    bad = _run_page(DOC_WITH_MODEL.replace("--model ", ""), tmp_path / "bad", quickstart_run)
    assert [o.status for o in bad] == ["ran", "failed"]
    assert "exit 2" in bad[1].message and "--model" in bad[1].message


def test_manual_check_fails_without_model_and_on_a_bad_override(tmp_path: Path) -> None:
    """Manual items are not run but must parse: a dropped `--model`, an unknown config key, an inline span that
    names no command or a missing recipe all fail; the correct forms pass."""
    page = """<!-- doctest: manual -->
```bash
alignkit generate --model runs/sft_smollm2_alpaca_lora --prompt "Hi"
alignkit generate runs/sft_smollm2_alpaca_lora --prompt "Hi"
alignkit train sft --config recipes/sft_smollm2_alpaca_lora.yaml train.max_steps=2
alignkit train sft --config recipes/sft_smollm2_alpaca_lora.yaml train.max_stepz=2
alignkit train sft --config recipes/no_such_recipe.yaml
python -m alignkit.tasks.word_problems --out runs/x --data ../shared/data
python -m alignkit.tasks.word_problems --no-such-flag
```

Prose: `alignkit generate --model runs/x ...`, `alignkit generate runs/x ...`, `alignkit servve`, `alignkit train <stage>`.
"""
    outcomes = _run_page(page, tmp_path / "w")
    assert [o.status for o in outcomes] == ["manual", "failed", "manual", "failed", "failed", "manual", "failed",
                                            "manual", "failed", "failed", "manual"], [o.message for o in outcomes]
    assert "required: --model" in outcomes[1].message
    assert "unrecognized arguments: runs/x" in outcomes[8].message
    assert "train.max_stepz" in outcomes[3].message
    assert "does not exist" in outcomes[4].message
    assert "--no-such-flag" in outcomes[6].message
    assert "not a command" in outcomes[9].message


def test_runner_runs_snippets_in_one_namespace_and_compares_marked_output(tmp_path: Path) -> None:
    page = """```python
import alignkit
x = 20
```

```python
print(x + 22)
```

<!-- doctest: output -->
```
42
```

<!-- doctest: output -->
```
43
```
"""
    outcomes = _run_page(page, tmp_path / "w")
    assert [o.status for o in outcomes] == ["ran", "ran", "ran", "failed"]
    assert "output differs" in outcomes[3].message
    assert summarise(outcomes)["snippets run"] == 2 and summarise(outcomes)["outputs compared"] == 1


def test_unknown_commands_must_be_marked(tmp_path: Path) -> None:
    page = "```bash\nmake everything\n```\n\n<!-- doctest: skip needs a GPU -->\n```bash\nnvidia-smi\n```\n"
    outcomes = _run_page(page, tmp_path / "w")
    assert [o.status for o in outcomes] == ["failed", "skipped"]
    assert "mark the block" in outcomes[0].message


def test_setup_and_export(tmp_path: Path) -> None:
    page = """<!-- doctest: setup
echo '{"k": 1}' > made.json
-->

```bash
export DOCTEST_VALUE=7
python -c "import os, json; assert os.environ['DOCTEST_VALUE'] == '7' and json.load(open('made.json'))['k'] == 1"
python -c "raise SystemExit(3)"
```
"""
    outcomes = _run_page(page, tmp_path / "w")
    assert [o.status for o in outcomes] == ["ran", "ran", "ran", "failed"], [o.message for o in outcomes]
    assert "exit 3" in outcomes[3].message
