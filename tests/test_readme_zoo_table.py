"""The README's supported-architectures table is the one the coverage matrix generates."""

from __future__ import annotations

from pathlib import Path

from zoo_models import markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_has_the_generated_architecture_table() -> None:
    table = markdown().strip()
    assert table.count("\n") > 40, "the matrix should have dozens of rows"
    assert table in README.read_text(), (
        "README's supported-architectures table is stale: paste the output of "
        "`.venv/bin/python -m tests.zoo_models --markdown`"
    )
