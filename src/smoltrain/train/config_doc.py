"""docs/config.md, written from the config's dataclasses: every key, its default and the
comment beside (or above) its field. `python -m smoltrain.train.config_doc` rewrites it;
tests/train/test_config_doc.py fails while it is stale or a field has no comment."""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

from smoltrain.train.config import TrainConfig

HEADER = """# Every config key

Generated from the dataclasses by `python -m smoltrain.train.config_doc` (a test checks it is
current). A YAML file sets any of them (`configs/`); `key=value` on the command line overrides
one (`smoltrain train --config C train.precision=fp32`). Model fields (`model.overrides`) are
`ModelConfig`'s (`smoltrain/model/config.py`).
"""


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    tree_fields = [f.name for f in dataclasses.fields(cls)]
    comments: dict[int, str] = {}
    code_lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("# ").strip()
        elif token.type == tokenize.NAME and token.start[1] == 4 and token.start[0] not in code_lines:
            code_lines[token.start[0]] = token.string
    found = {}
    for line, name in code_lines.items():
        if name not in tree_fields or name in found:
            continue
        if line in comments:
            found[name] = comments[line]
            continue
        above, n = [], line - 1
        while n in comments and n not in code_lines:
            above.insert(0, comments[n])
            n -= 1
        if above:
            found[name] = " ".join(above)
    return found


def rows(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(key, default, description) for every field of `cls`, a section's fields expanded."""
    described = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += rows(type(default), f"{key}.")
            continue
        if f.name not in described:
            raise ValueError(f"config key {key} has no comment in {cls.__name__}: say what it holds")
        out.append((key, repr(default), described[f.name]))
    return out


def render() -> str:
    lines = [HEADER, "| key | default | what it holds |", "| --- | --- | --- |"]
    for key, default, text in rows(TrainConfig, ""):
        text = text.replace("|", "\\|")  # a pipe inside a table cell
        lines.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/config.md")
    target.write_text(render())
    print(f"wrote {target}")
