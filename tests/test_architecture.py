"""Imports run one way: every module's imports (top-level and inside functions) against the layer table in
docs/architecture.md, and no circle among modules. Reads source only (ast): no MindSpore import."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mindrlhf"


def read_layers(doc: Path) -> dict:
    """{unit: layer} from the fenced table under '## Layers': a unit is a folder ('data') or a top-level module
    ('errors'); the package root is outside the table."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1]
    block = section.split("```", 2)[1]
    layers = {}
    for line in block.splitlines():
        match = re.match(r"^\s*(\d+)\s+(.+)$", line)
        if match:
            for unit in match.group(2).split():
                layers[unit.rstrip("/").removesuffix(".py")] = int(match.group(1))
    return layers


def modules(package_dir: Path) -> dict:
    """{dotted module name: path} of every .py file of the package."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, known: dict) -> list:
    """[(line, imported module)] of one module: `from a.b import c` is a.b.c when that is a module, else a.b."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return [(line, target) for line, target in found if target == PACKAGE or target.startswith(PACKAGE + ".")]


def unit_of(name: str):
    """The folder or top-level module a module belongs to; None for the package root."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def check(package_dir: Path, layers: dict) -> list:
    """Every import that runs upward or sideways against `layers`, every module the table leaves out, and every
    circle among modules, as messages."""
    known = modules(package_dir)
    problems, graph = [], {}
    for name, path in known.items():
        unit = unit_of(name)
        if unit is not None and unit not in layers:
            problems.append(f"{path}: {unit} has no layer in docs/architecture.md")
            continue
        graph[name] = set()
        for line, target in imports_of(path, name, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            graph[name].add(target)
            there = unit_of(target)
            if unit is None or there is None or there == unit:
                continue  # the package root stands outside the table; a folder imports itself freely
            if there not in layers:
                problems.append(f"{path}:{line}: imports {target}, whose {there} has no layer")
            elif layers[there] >= layers[unit]:
                way = "upward" if layers[there] > layers[unit] else "sideways"
                problems.append(f"{path}:{line}: {name} (layer {layers[unit]}) imports {target} (layer "
                                f"{layers[there]}): {way}")
    problems += [f"import circle: {' -> '.join(circle)}" for circle in circles(graph)]
    return problems


def circles(graph: dict) -> list:
    """One circle through each strongly connected group of modules (package roots excluded: every import of a
    submodule passes through its package's __init__)."""
    edges = {n: {t for t in targets if t in graph and t != n and not n.startswith(t + ".")} for n, targets in
             graph.items()}
    seen, found = set(), []

    def walk(node, path, on_path):
        for nxt in sorted(edges[node]):
            if nxt in on_path:
                circle = path[path.index(nxt):] + [nxt]
                if frozenset(circle) not in seen:
                    seen.add(frozenset(circle))
                    found.append(circle)
            elif nxt not in done:
                walk(nxt, path + [nxt], on_path | {nxt})
        done.add(node)

    done = set()
    for start in sorted(edges):
        if start not in done:
            walk(start, [start], {start})
    return found


def test_imports_follow_the_layers_in_docs_architecture():
    layers = read_layers(ROOT / "docs" / "architecture.md")
    assert layers["errors"] < layers["data"] < layers["model"] < layers["serving"]
    assert check(ROOT / PACKAGE, layers) == []


def test_no_module_imports_another_modules_private_names():
    """What two modules share is public in the module that owns it: an underscore name is free to change without
    looking for users in other files."""
    reached = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                reached += [f"{path.relative_to(ROOT)}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not reached


def write_package(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / PACKAGE


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "errors.py": "", "data/__init__.py": "", "data/rows.py": "import os\n",
      "model/__init__.py": "", "model/net.py": "from mindrlhf.data import rows\nfrom mindrlhf import errors\n"}, []),
    ({"__init__.py": "", "data/__init__.py": "", "data/rows.py": "def f():\n    from mindrlhf.model.net import g\n",
      "model/__init__.py": "", "model/net.py": "g = 1\n"}, ["upward"]),
    ({"__init__.py": "", "data/__init__.py": "", "data/rows.py": "from mindrlhf.kernels import build\n",
      "kernels/__init__.py": "", "kernels/build.py": ""}, ["sideways"]),
    ({"__init__.py": "", "data/__init__.py": "", "data/a.py": "from mindrlhf.data import b\n",
      "data/b.py": "from . import a\n"}, ["import circle: mindrlhf.data.a -> mindrlhf.data.b -> mindrlhf.data.a"]),
    ({"__init__.py": "", "extra/__init__.py": ""}, ["has no layer"]),
])
def test_the_check_finds_upward_sideways_and_circular_imports(tmp_path, files, expected):
    layers = {"errors": 0, "data": 1, "kernels": 1, "model": 3}
    problems = check(write_package(tmp_path, files), layers)
    assert len(problems) == len(expected), problems
    for problem, wanted in zip(problems, expected):
        assert wanted in problem
