"""The import rules of the architecture, read from the source (every import, module level or inside a function):
flows → stages → {workers, storage, algorithms}; workers use algorithms and storage; storage and algorithms import
nothing of ours; nothing imports flows but the command line (ppoflow/); no import cycle between modules at module
level. And `import flows` stays cheap: no torch, Ray, vLLM or DeepSpeed.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "stages", "workers", "storage", "algorithms", "ppoflow")
ALLOWED = {  # package → the packages of ours it may import
    "flows": {"flows", "stages"},
    "stages": {"stages", "workers", "storage", "algorithms"},
    "workers": {"workers", "storage", "algorithms"},
    "storage": {"storage"},
    "algorithms": {"algorithms"},
    "ppoflow": set(PACKAGES),  # the command line and the tasks sit above everything
}


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {name for name in out if name.split(".")[0] in PACKAGES}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for package in PACKAGES for p in (REPO / package).rglob("*.py")}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    bad = [f"{module} imports {name}" for module, path in _modules().items() if module.split(".")[0] == package
           for name in _imports(path) if name.split(".")[0] not in ALLOWED[package]]
    assert not bad, bad


def test_no_cycle_between_modules_at_import_time():
    modules = _modules()
    graph = {m: {n.removesuffix(".__init__") for n in _imports(p, module_level_only=True) if n in modules}
             for m, p in modules.items()}

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])

    for module in graph:
        visit(module, [])


def test_import_flows_is_cheap():
    code = ("import sys, flows.ppo, flows.retrain; "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
