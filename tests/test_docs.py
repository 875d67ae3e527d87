"""The method descriptions the code cites live in the repository, and every cited section exists."""

import re
from pathlib import Path

from helpers import ROOT

DOC = ROOT / "docs" / "methods.md"
FOLDERS = ("api", "cli", "experiments", "sparsity", "data", "tests", "benchmarks", "docs")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt"}
CITATION = re.compile(r"docs/methods\.md#([\w-]+)")


def _project_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES]
    for folder in FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return files


def _anchor(heading: str) -> str:
    # GitHub's rule: lower case, punctuation other than '-' dropped, spaces to '-'
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors() -> set[str]:
    return {_anchor(line.lstrip("#")) for line in DOC.read_text().splitlines() if line.startswith("#")}


def test_anchor_rule():
    assert _anchor("Transposable masks") == "transposable-masks"
    assert _anchor("SR-STE") == "sr-ste" and _anchor("Bi-Mask") == "bi-mask"


def test_every_cited_section_exists():
    anchors = _anchors()
    cited = {(path.relative_to(ROOT).as_posix(), anchor) for path in _project_files()
             for anchor in CITATION.findall(path.read_text(errors="replace"))}
    assert len(cited) >= 8                              # the code, help strings, specs and tests cite it
    missing = sorted(c for c in cited if c[1] not in anchors)
    assert not missing, f"cited sections that docs/methods.md lacks: {missing}"


def test_every_internal_link_of_the_doc_resolves():
    anchors = _anchors()
    links = re.findall(r"\]\(#([\w-]+)\)", DOC.read_text())
    assert links and all(link in anchors for link in links), sorted(set(links) - anchors)


def test_nothing_cites_the_old_outside_specification():
    old = "METHODS" + ".md"    # spelled apart so that this file does not cite it
    citing = [path.relative_to(ROOT).as_posix() for path in _project_files() if old in path.read_text(errors="replace")]
    assert citing == []
