"""The house's floors, enforced: a module imports only floors below its own (docs/architecture.md).

    top        raylm.cli, raylm.demo
    stages     raylm.data | raylm.training | raylm.serving | raylm.cluster   (rooms side by side)
    inference  raylm.inference
    model      raylm.model
    core       raylm.core
    root       raylm (the package itself: __version__)

A floor may import its own room and any floor below. Stages never import each other, except that
training reads what data writes (training -> raylm.data). Every import is read with `ast`:
module-level and function-level, `import X` and `from X import Y`, relative imports resolved, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Floors bottom up; a stage's rooms share one floor.
FLOORS = ["root", "core", "model", "inference", "stages", "top"]
STAGES = ("data", "training", "serving", "cluster")
ALLOWED_SIDEWAYS = {("training", "data")}  # training reads data's formats (dataset dirs, chat records)


@dataclass(frozen=True)
class Violation:
    file: Path
    line: int
    importer: str
    target: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} imports {self.target}: {self.rule}"


def source_roots(repo: Path) -> dict[Path, str]:
    """Folder -> the package it installs as: raylm/ itself plus pyproject's package-dir mapping."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return {repo / "raylm": "raylm", **{repo / folder: package for package, folder in mapping.items()}}


def room_of(module: str) -> str | None:
    """The room a raylm module lives in ('core', 'training', 'top', ...); None for a module on no floor."""
    parts = module.split(".")
    if parts[0] != "raylm":
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] in ("core", "model", "inference", *STAGES):
        return parts[1]
    if parts[1] in ("cli", "demo"):
        return "top"
    return None


def floor_of(room: str) -> str:
    return "stages" if room in STAGES else room


def module_of(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """(line, module) for every module that `tree` imports."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield node.lineno, submodule if submodule in known else source
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            first = node.args[0]
            literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
            if name in ("import_module", "__import__") and literal and not literal.startswith("."):
                yield node.lineno, literal


def rule_broken(importer: str, target: str) -> str | None:
    """Why `importer` may not import `target`, or None when it may."""
    here, there = room_of(importer), room_of(target)
    if there is None:
        return f"{target} is on no floor (a raylm module must live in one of {', '.join(FLOORS[1:])})"
    if here == there:
        return None
    here_floor, there_floor = floor_of(here), floor_of(there)
    if FLOORS.index(there_floor) < FLOORS.index(here_floor):
        return None
    if there_floor == here_floor:
        if (here, there) in ALLOWED_SIDEWAYS:
            return None
        return f"sideways: stages never import each other ({here} -> {there}); only training may import raylm.data"
    return f"upward: the {here_floor} floor imports only floors below it, and {there_floor} is above"


def check_tree(roots: dict[Path, str]) -> list[Violation]:
    files = {path: module_of(path, root, package) for root, package in roots.items() for path in sorted(root.rglob("*.py"))}
    known = set(files.values())
    violations = []
    for path, module in files.items():
        if room_of(module) is None:
            violations.append(Violation(path, 1, module, module, "this file is on no floor; give it one in tests/test_layering.py"))
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py", known):
            if target.split(".")[0] != "raylm":
                continue
            rule = rule_broken(module, target)
            if rule:
                violations.append(Violation(path, line, module, target, rule))
    return violations


def raylm_imports_of_core(roots: dict[Path, str]) -> list[tuple[Path, int, str]]:
    """Every raylm import made by raylm/core that is not of raylm.core itself (the root included)."""
    core = next(root for root, package in roots.items() if package == "raylm") / "core"
    files = {path: module_of(path, core, "raylm.core") for path in sorted(core.rglob("*.py"))}
    found = []
    for path, module in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py", set(files.values())):
            if target.split(".")[0] == "raylm" and not (target == "raylm.core" or target.startswith("raylm.core.")):
                found.append((path.relative_to(core.parent.parent), line, target))
    return found


# ---- the real tree -------------------------------------------------------------------------------


def test_every_import_goes_down_a_floor():
    roots = source_roots(REPO)
    assert set(roots.values()) == {"raylm", *(f"raylm.{stage}" for stage in STAGES)}
    checked = sum(1 for root in roots for _ in root.rglob("*.py"))
    assert checked >= 40  # the walk really saw the tree
    violations = check_tree(roots)
    assert not violations, "layering violations:\n" + "\n".join(str(v) for v in violations)


def test_core_imports_nothing_of_raylm_outside_core():
    found = raylm_imports_of_core(source_roots(REPO))
    assert not found, "raylm/core imports outside core:\n" + "\n".join(f"{p}:{line}: {t}" for p, line, t in found)


# ---- the checker can fail ------------------------------------------------------------------------


def write(root: Path, relative: str, text: str = "") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def synthetic_tree(tmp_path: Path) -> dict[Path, str]:
    for package in ("raylm", "raylm/core", "raylm/model", "raylm/inference", "serving", "training", "data"):
        write(tmp_path, f"{package}/__init__.py")
    write(tmp_path, "raylm/core/errors.py", "class UserError(Exception): ...\n")
    write(tmp_path, "raylm/inference/engine.py", "from raylm.model import transformer\nfrom ..core.errors import UserError\n")
    # Upward: the model floor imports the inference floor (line 3), and again by name (line 6).
    write(tmp_path, "raylm/model/transformer.py", """\
        import json
        from raylm.core.errors import UserError
        from raylm.inference.engine import Engine
        def load():
            import importlib
            return importlib.import_module("raylm.inference.engine")
        """)
    # Sideways: serving imports training, inside a function (line 4) and relatively (line 5).
    write(tmp_path, "serving/app.py", """\
        from raylm.model.transformer import load
        from . import api
        def build():
            from raylm.training import loop
            from ..training.loop import train
        """)
    write(tmp_path, "serving/api.py", "from raylm.inference import engine\n")
    write(tmp_path, "training/loop.py", "from raylm.data import prepare\nfrom raylm.serving.app import build\n")
    write(tmp_path, "data/prepare.py", "import raylm\nfrom raylm import __version__\n")
    write(tmp_path, "raylm/core/config.py", "from raylm import __version__\n")
    return {
        tmp_path / "raylm": "raylm",
        tmp_path / "serving": "raylm.serving",
        tmp_path / "training": "raylm.training",
        tmp_path / "data": "raylm.data",
    }


def test_the_checker_reports_upward_and_sideways_imports_with_file_and_line(tmp_path):
    violations = check_tree(synthetic_tree(tmp_path))
    found = {(v.file.relative_to(tmp_path).as_posix(), v.line, v.target) for v in violations}
    assert found == {
        ("raylm/model/transformer.py", 3, "raylm.inference.engine"),  # upward
        ("raylm/model/transformer.py", 6, "raylm.inference.engine"),  # upward, by importlib
        ("serving/app.py", 4, "raylm.training.loop"),  # sideways, function-level
        ("serving/app.py", 5, "raylm.training.loop"),  # sideways, relative
        ("training/loop.py", 2, "raylm.serving.app"),  # sideways (training -> data on line 1 is allowed)
    }
    by_line = {(v.file.name, v.line): v for v in violations}
    assert by_line[("transformer.py", 3)].rule.startswith("upward: the model floor")
    assert by_line[("app.py", 4)].rule.startswith("sideways: stages never import each other (serving -> training)")
    text = str(by_line[("app.py", 4)])
    assert text.startswith(f"{tmp_path / 'serving' / 'app.py'}:4: raylm.serving.app imports raylm.training.loop: sideways")


def test_the_checker_puts_a_module_on_no_floor_in_the_report(tmp_path):
    roots = synthetic_tree(tmp_path)
    write(tmp_path, "raylm/utils.py", "")
    write(tmp_path, "raylm/core/paths.py", "from raylm.helpers import x\n")
    found = {(v.file.name, v.line, v.target): v.rule for v in check_tree(roots)}
    assert found[("utils.py", 1, "raylm.utils")].startswith("this file is on no floor")
    assert found[("paths.py", 1, "raylm.helpers")].startswith("raylm.helpers is on no floor")


def test_the_core_check_reports_an_import_of_raylm_outside_core(tmp_path):
    roots = synthetic_tree(tmp_path)
    assert raylm_imports_of_core(roots) == [(Path("raylm/core/config.py"), 1, "raylm")]
