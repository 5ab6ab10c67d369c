"""No code path in the package unpickles: every `torch.load(` passes `weights_only=True`."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "alignkit"


def torch_load_calls(source: str) -> list[str]:
    """The text of each `torch.load(...)` call, up to its matching parenthesis."""
    calls = []
    for match in re.finditer(r"torch\.load\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(source[match.start() : i])
    return calls


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    for path in files:
        for call in torch_load_calls(path.read_text()):
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {call}")
    assert offenders == [], "torch.load without weights_only=True unpickles arbitrary code:\n" + "\n".join(offenders)


def test_the_check_catches_an_unsafe_call() -> None:
    assert torch_load_calls("x = torch.load(f, map_location=dict(a=1))\ny = torch.load(g, weights_only=True)") == [
        "torch.load(f, map_location=dict(a=1))", "torch.load(g, weights_only=True)"]
