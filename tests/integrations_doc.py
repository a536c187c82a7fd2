"""The code of docs/integrations.md, as the framework tests run it: what a user copies."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the heading ``## {section}``, dedented, in order; each is
    preceded by blank lines, so that a traceback's line numbers are the doc's."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    end = end if end > 0 else len(text)
    fence = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)
    return [
        "\n" * text.count("\n", 0, m.start(2)) + textwrap.dedent(m.group(2))
        for m in fence.finditer(text, start, end)
    ]


def run_block(section: str, index: int = 0) -> dict:
    """Execute one block as a module would (its names in a fresh namespace)."""
    namespace: dict = {"__name__": "integrations_doc"}
    exec(compile(python_blocks(section)[index], str(DOC), "exec"), namespace)
    return namespace
