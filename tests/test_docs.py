"""The project explains itself in docs/: every `docs/<file>.md#<section>` the code, the README or the docs
cite names a file and a heading that exist, and nothing cites a file outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [path for pattern in ("*.py", "*.md", "*.toml", "*.sh", "Makefile")
           for folder in ("bench", "methods", "docs", "tests", "benchmarks", "scripts", ".")
           for path in (ROOT / folder).glob(pattern if folder == "." else f"**/{pattern}")]
CITATION = re.compile(r"\b((?:docs/)?[A-Za-z_]+\.md)#([a-z0-9-]+)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(doc: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def test_every_cited_section_exists():
    known: dict[Path, set[str]] = {}
    checked, broken = 0, []
    for source in SOURCES:
        for name, section in CITATION.findall(source.read_text(encoding="utf-8", errors="replace")):
            doc = ROOT / ("README.md" if Path(name).name == "README.md" else f"docs/{Path(name).name}")
            if not doc.exists():
                broken.append(f"{source.relative_to(ROOT)}: {name} does not exist")
                continue
            known.setdefault(doc, anchors(doc))
            if section not in known[doc]:
                broken.append(f"{source.relative_to(ROOT)}: {name}#{section} names no heading")
            checked += 1
    assert not broken, "\n".join(sorted(set(broken)))
    assert checked > 50


def test_nothing_cites_a_file_outside_the_repository():
    for source in SOURCES:
        if source.resolve() == Path(__file__).resolve():
            continue
        text = source.read_text(encoding="utf-8", errors="replace")
        assert "shared/reference" not in text and "../shared" not in text, source.relative_to(ROOT)
