"""The package's import graph: one direction, adapters → description → sweep → ops → kernels, no loop (function-local
imports included), and no module reaching into another's private names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each module may import its own layer and those below it. The description (adapters/spec.py) is the vocabulary the
# adapters write and the sweep reads; the leaves are shared by the ops and the kernels' launchers.
LAYERS = [
    ("leaves", ["_numerics", "_target", "errors"]),
    ("kernels", ["triton_kernels"]),
    ("ops", ["_backend", "ops"]),
    ("description", ["adapters.spec", "explanation", "conservation"]),
    ("adapters", ["adapters"]),
    ("sweep", ["sweep"]),
    ("methods", ["methods"]),
    ("interfaces", ["api", "cli", "__main__", "evaluation", ""]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "transformer_lrp").rglob("*.py"):
        rel = path.relative_to(ROOT / "transformer_lrp").with_suffix("")
        found[".".join(p for p in rel.parts if p != "__init__")] = path
    for path in (ROOT / "triton_kernels").glob("*.py"):
        found["triton_kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def _layer(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") or p == "") and len(p) > best:
                best, index = len(p), i
    assert index is not None, module
    return index


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module → {(imported module, imported name or None)} over every import statement, nested ones included."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("transformer_lrp"):
                        edges.add((alias.name.removeprefix("transformer_lrp").lstrip("."), None))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    target = ".".join(p for p in (base, node.module or "") if p)
                elif node.module and node.module.startswith("transformer_lrp"):
                    target = node.module.removeprefix("transformer_lrp").lstrip(".")
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}".lstrip(".")
                    edges.add((sub, None) if sub in modules else (target, alias.name))
        graph[name] = {(m, n) for m, n in edges if m != name}
    return graph


def test_every_import_points_down_the_layers():
    modules = _modules()
    wrong = []
    for src, edges in _imports(modules).items():
        for dst, _ in edges:
            if dst in modules and _layer(dst) > _layer(src):
                wrong.append(f"{src} ({LAYERS[_layer(src)][0]}) imports {dst} ({LAYERS[_layer(dst)][0]})")
    assert not wrong, wrong


def test_no_import_loop():
    modules = _modules()
    graph = {m: {d for d, _ in edges if d in modules} for m, edges in _imports(modules).items()}
    # a package imports its submodules through its own __init__; a submodule importing its package's __init__
    # is fine only when that __init__ does not lead back to it
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError(f"import loop: {' → '.join(path + [m, d])}")
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_private_names_across_modules():
    modules = _modules()
    reaching = [f"{src} imports {name} from {dst}" for src, edges in _imports(modules).items()
                for dst, name in edges if name is not None and name.startswith("_")]
    assert not reaching, reaching


def test_the_layer_table_knows_every_module():
    for m in _modules():
        _layer(m)


def test_kernels_import_from_an_uninstalled_source_tree(tmp_path):
    """A bare GPU machine may run the checkout with ``PYTHONPATH=.`` and no install (or after a failed CUDA build):
    ``transformer_lrp.triton_kernels`` must still be the top-level ``triton_kernels/`` folder."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()\n"
        "                 and 'editable' not in type(f).__module__.lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from transformer_lrp.triton_kernels import _launch\n"
        "print(_launch.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "triton_kernels" / "_launch.py")
