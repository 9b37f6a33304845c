"""The structure holds: imports go one way, each concept has one home, and reading a
config loads no model runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "pipelines", "jobs")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports anywhere in its file: at the top, inside
    functions (lazy) and under ``if TYPE_CHECKING``. Importing ``a.b.c`` runs ``a`` and
    ``a.b`` too, unless the importer lives inside them (they are already running)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in known and not (name == mod or name.startswith(mod + ".")):
                    found.add(mod)
    return found


def test_no_import_circle_lazy_imports_included():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    # The bottom of the layers imports nothing above it.
    assert not {m for m in graph["pipelines.config"] if m.startswith(("pipelines", "jobs"))}
    for low in ("actors.tasks", "actors.backends", "actors.reducer"):
        above = {
            m
            for name in graph
            if name == low or name.startswith(low + ".")
            for m in graph[name]
            if m.startswith(("pipelines", "jobs", "actors.host"))
        }
        assert not above, f"{low} imports {above}"


def _names_compared(path: Path) -> list[tuple[int, str]]:
    """String constants a file compares with (``==``, ``!=``, ``in``), with their lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for v in values:
                    if isinstance(v, ast.Constant) and isinstance(v.value, str):
                        out.append((node.lineno, v.value))
    return out


def test_task_and_backend_names_are_tested_in_their_own_package_only():
    from actors.backends import BACKENDS
    from actors.tasks import TASKS

    homes = {"task": ("actors/tasks/", set(TASKS)), "backend": ("actors/backends/", set(BACKENDS))}
    found = []
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for what, (home, names) in homes.items():
            if rel.startswith(home):
                continue
            found += [
                f"{rel}:{line}: {what} '{v}'" for line, v in _names_compared(path) if v in names
            ]
    assert not found, "\n".join(found)


def test_reading_a_config_imports_no_model_runtime(tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "m.onnx").write_bytes(b"not read")
    config.write_text(
        "name: t\nlabels: [a, b]\nmembers:\n  - {name: m, model: org/m}\n"
        "  - {name: o, model: m.onnx, backend: onnx, onnx_output: logits}\n"
    )
    code = (
        "import sys\nfrom pipelines.config import load_config\n"
        f"cfg = load_config({str(config)!r})\n"
        "print(cfg.members[1].options.onnx_output)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'ray', 'fastapi') "
        "if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["logits", "[]"]
