"""The code of docs/integrations.md, as the framework tests run it: what a user copies."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the heading ``## {section}``, dedented, in order."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else len(text)]
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", body, re.M | re.S)
    return [textwrap.dedent(code) for _, code in blocks]


def run_block(section: str, index: int = 0) -> dict:
    """Execute one block (as a module would: its names in a fresh namespace)."""
    namespace: dict = {"__name__": "integrations_doc"}
    exec(compile(python_blocks(section)[index], str(DOC), "exec"), namespace)
    return namespace
