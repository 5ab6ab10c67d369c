from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gpu.helpers import exact_fp32


@pytest.fixture(autouse=True)
def _exact_fp32() -> Iterator[None]:
    with exact_fp32():
        yield
