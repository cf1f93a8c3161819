"""Every example config in the repository loads, so the examples can never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from reexec.daemon.config import Config, load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    load_config(path)


def test_annotated_example_is_the_embedded_default() -> None:
    assert load_config(EXAMPLES[[p.name for p in EXAMPLES].index("reexecd.toml")]) == Config()
