"""The method descriptions the code cites live in the repository, and every cited section exists; the
public API's documentation (docs/api.md, the README's "In your own training loop") names every public
name, uses no other, and its example runs."""

import re
from pathlib import Path

import torch
from torch import nn

import nmtrain
from helpers import ROOT

DOC = ROOT / "docs" / "methods.md"
API_DOC = ROOT / "docs" / "api.md"
EXAMPLE = ROOT / "docs" / "examples" / "own_loop.py"
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


# -- the public API's documentation ---------------------------------------------------------------


def _section(text: str, title: str) -> str:
    """The markdown section headed ``## title``, up to the next heading of its level."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _own_loop_section() -> str:
    return _section((ROOT / "README.md").read_text(), "In your own training loop")


def test_api_doc_covers_every_public_name():
    text = API_DOC.read_text()
    undocumented = [n for n in nmtrain.__all__ if f"nmtrain.{n}".replace("_", r"\_") not in text
                    and f"nmtrain.{n}" not in text]
    undocumented += [f"masks.{n}" for n in nmtrain.masks.__all__ if not re.search(rf"`{n}[(`]", text)]
    assert not undocumented, f"public names docs/api.md does not document: {undocumented}"
    handle = _section(text, "nmtrain.Sparsified")
    members = [n for n in vars(nmtrain.Sparsified) if not n.startswith("_")]
    assert len(members) >= 10 and all(re.search(rf"`{n}[(`]", handle) for n in members), members


def test_api_doc_and_readme_links_resolve():
    for doc in (API_DOC, ROOT / "README.md"):
        text = doc.read_text()
        anchors = {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            if not path:
                assert anchor in anchors, f"{doc.name}: no section #{anchor}"
                continue
            resolved = (doc.parent / path).resolve()
            assert resolved.exists(), f"{doc.name} links {target}: no such file"
            if anchor and resolved.suffix == ".md":
                lines = resolved.read_text().splitlines()
                assert anchor in {_anchor(line.lstrip("#")) for line in lines if line.startswith("#")}, \
                    f"{doc.name} links {target}: no such section"


def test_readme_and_example_use_only_documented_names():
    """Nothing outside the documented names is needed for the README's example and docs/examples/."""
    for text in (_own_loop_section(), EXAMPLE.read_text()):
        for name, attr in re.findall(r"\bnmtrain\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", text):
            assert name in nmtrain.__all__, f"nmtrain.{name} is not public"
            if name == "masks" and attr:
                assert attr in nmtrain.masks.__all__, f"nmtrain.masks.{attr} is not public"
        for member in re.findall(r"\bhandle\.([A-Za-z_]\w*)", text):
            assert member in vars(nmtrain.Sparsified) or member in ("layers", "skipped", "model", "method",
                                                                   "optimizer"), member
    assert "nmtrain.experiments" not in EXAMPLE.read_text() and "nmtrain.data" not in EXAMPLE.read_text()


class _MyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_readme_own_loop_example_runs(tmp_path, monkeypatch):
    """The README's 15 lines, as written, with a model and a loader of ours: 2:4 weights and an export."""
    code = re.search(r"```python\n(.*?)```", _own_loop_section(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    loader = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    scope = {"MyNet": _MyNet, "loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    model, handle = scope["model"], scope["handle"]
    assert handle.step == 3 and list(handle.layers) == ["2"]
    assert nmtrain.masks.nm_violation(model[2].weight, nmtrain.masks.parse_pattern("2:4"), exact=True) is None
    assert int((model[0].weight == 0).sum()) == 0            # the first layer stays dense
    assert (tmp_path / "model-2of4.safetensors").stat().st_size > 0
