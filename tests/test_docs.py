"""Every registered method is documented in docs/methods.md with a citation."""

from __future__ import annotations

import re
from pathlib import Path

from alloykit.methods import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_every_method_has_a_citation_and_a_docs_entry() -> None:
    text = DOCS.read_text()
    headings = set(re.findall(r"^## (\S+)$", text, flags=re.MULTILINE))
    for name, method in METHODS.items():
        assert name in headings, f"docs/methods.md has no section for {name}"
        assert re.search(r"(arXiv:\d{4}\.\d{4,5}|\d{4})", method.citation), name
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for param in method.params:
            assert f"`{param.name}`" in section, f"{name}: parameter {param.name} undocumented"
