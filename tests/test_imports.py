"""The house rules, read from the source: which room may import which, no circles, no lazy imports that hide one,
public names only across packages, and `fm` free of Ray and MLflow."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fm", "pipelines", "jobs", "benchmarks")
STAGES = ("ingest", "train", "batch")


def _modules() -> dict[str, Path]:
    """Every module of the project by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _target(module: str, name: str) -> str:
    """The project module an import names: `from pipelines.core import storage` is pipelines.core.storage."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


def _imports(path: Path) -> list[tuple[str, int, bool, list[str], str]]:
    """(imported project module, line, at top level, names, the module as written) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                out.append((_target(node.module, alias.name), node.lineno, id(node) in top, [alias.name], node.module))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    out.append((alias.name, node.lineno, id(node) in top, [], alias.name))
    return out


def _room(module: str) -> str:
    """pipelines.core.x -> "core", pipelines.chain -> "chain", jobs.x -> "jobs", fm.x -> "fm"."""
    parts = module.split(".")
    if parts[0] != "pipelines":
        return parts[0]
    return parts[1] if len(parts) > 1 else "pipelines"


ALLOWED = {
    "fm": {"fm"},
    "core": {"fm", "core"},
    **{stage: {"fm", "core", stage} for stage in STAGES},
    "chain": {"fm", "core", *STAGES, "chain"},  # the only modules that combine stages (with jobs/)
    "compare": {"fm", "core", "compare"},
    "sweep": {"fm", "core", "train", "chain", "compare", "sweep"},  # Ray Tune over training runs
    "reflow": {"fm", "core", *STAGES, "chain", "reflow"},  # sample -> ingest pairs -> train -> evaluate, k rounds
    "sample_sweep": {"fm", "core", "batch", "train", "chain", "sample_sweep"},  # samplers x models on the batch stage
    "pipelines": set(),  # no re-export shims in pipelines/__init__.py
    "jobs": {"fm", "core", *STAGES, "chain", "compare", "sweep", "reflow", "sample_sweep", "jobs"},
    "benchmarks": {"fm", "core", *STAGES, "chain", "compare", "sweep", "reflow", "sample_sweep", "jobs", "benchmarks"},
}


def test_each_room_imports_only_the_rooms_below_it():
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {_room(module)} imports {target}"
        for module, path in MODULES.items()
        for target, line, _, _, _ in _imports(path)
        if _room(target) not in ALLOWED[_room(module)]
    ]
    assert wrong == []


def test_no_import_circles():
    graph = {m: {t for t, *_ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_lazy_import_of_a_module_also_imported_at_the_top():
    twice = []
    for path in MODULES.values():
        found = _imports(path)
        top = {written for _, _, at_top, _, written in found if at_top}
        twice += [
            f"{path.relative_to(ROOT)}:{line}: {written}"
            for _, line, at_top, _, written in found
            if not at_top and written in top
        ]
    assert twice == []


def test_jobs_and_benchmarks_use_public_names_only():
    private = [
        f"{path.relative_to(ROOT)}:{line}: {target}.{names[0]}"
        for module, path in MODULES.items()
        if _room(module) in ("jobs", "benchmarks")
        for target, line, _, names, written in _imports(path)
        if names and names[0].startswith("_") and _room(written) != _room(module)
    ]
    assert private == []


def test_package_inits_hold_no_code():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module.startswith("pipelines"):
            body = ast.parse(path.read_text()).body
            assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), path


def test_the_rules_catch_a_stage_importing_another(tmp_path):
    # the checks above read real files: a stage module that reaches into a sibling stage is reported
    (tmp_path / "x.py").write_text("from pipelines.batch.evaluate import run_evaluation\n")
    found = _imports(tmp_path / "x.py")
    assert [(_room(t), top) for t, _, top, _, _ in found] == [("batch", True)]
    assert "batch" not in ALLOWED["train"] and "train" not in ALLOWED["core"]


def test_fm_does_not_import_ray_or_mlflow():
    code = (
        "import sys, fm, fm.likelihood, fm.metrics, fm.data, fm.ema; "
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _defined(path: Path) -> set[str]:
    """Names a module defines itself (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    # one home per name: no module re-exports another's (a moved name breaks its importers, not a shim)
    files = [*MODULES.values(), *sorted((ROOT / "tests").rglob("*.py"))]
    borrowed = [
        f"{path.relative_to(ROOT)}:{line}: {written}.{names[0]}"
        for path in files
        for target, line, _, names, written in _imports(path)
        if names
        and target == written
        and written.startswith("pipelines")
        and names[0] not in _defined(MODULES[written])
    ]
    assert borrowed == []
