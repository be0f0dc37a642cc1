"""docs/config.md is generated from the config's dataclasses and kept current."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from smoltrain.train import config_doc

REPO = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_current():
    """Regenerate it with `python -m smoltrain.train.config_doc` after changing a config field."""
    assert (REPO / "docs/config.md").read_text() == config_doc.render()


def test_every_key_is_listed_once_with_its_default_and_comment():
    rows = config_doc.rows(config_doc.TrainConfig, "")
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)) and {"train.precision", "data.holdout_every", "output_dir"} <= set(
        keys
    )
    precision = next(r for r in rows if r[0] == "train.precision")
    assert precision[1] == "'auto'" and "bf16" in precision[2]  # the comment above the field


def test_a_field_without_a_comment_is_named():
    @dataclass
    class Section:
        described: int = 1  # says what it holds
        bare: int = 2

    with pytest.raises(ValueError, match="section.bare has no comment"):
        config_doc.rows(Section, "section.")
