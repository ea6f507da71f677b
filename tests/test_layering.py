"""The layering of perk's modules, read from their imports (``ast``, nothing is imported).

* A command-line module (``python -m perk.X``) imports no other command-line module: what they
  share lives in library modules (:mod:`perk.runs`, :mod:`perk.methods`, ...) or in
  :mod:`perk.cli`, the argument-parsing helpers.
* A library module imports no command-line module.
* :mod:`perk.config`, the one home of the configs, imports nothing of the command-line layer,
  not even :mod:`perk.cli`.
* No class is longer than a newcomer can hold in mind (``MAX_CLASS_LINES``): the engine is split
  into the adapted model, the inner loop, the meta-gradient modes and PERK's own meta-parameters.
* The packages keep their boundaries (docs/design.md §6): ``perk_kernels`` imports nothing of
  ``perk``; ``perk`` reaches ``perk_kernels`` through its top-level names only; neither imports the
  repository's ``tools``, ``benchmarks`` or ``tests``; the wheel ships ``perk`` and ``perk_kernels``.
"""

import ast
from pathlib import Path

import pytest
import setuptools
from setuptools.config.pyprojecttoml import read_configuration

PACKAGE = Path(__file__).resolve().parents[1] / "perk"
CLI_MODULES = {"perk.train", "perk.eval", "perk.encode", "perk.data", "perk.check_meta_grad"}
CLI_LAYER = CLI_MODULES | {"perk.cli"}
MAX_CLASS_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, *, with_names: bool = False) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth of the file (``from a.b import c``
    counts as ``a.b``, and with ``with_names`` also as ``a.b.c``: c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if with_names:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def perk_imports(path: Path) -> set[str]:
    """Every ``perk`` module ``path`` imports, at any depth of the file (``from perk import eval``
    counts as ``perk.eval``)."""
    return {name for name in imports(path, with_names=True) if name in MODULES}


def test_every_command_line_module_is_there():
    assert CLI_MODULES <= set(MODULES)
    for name in CLI_MODULES:
        assert 'if __name__ == "__main__":' in MODULES[name].read_text(), f"{name} is not runnable with python -m"


@pytest.mark.parametrize("name", sorted(CLI_MODULES))
def test_no_command_line_module_imports_another(name):
    assert not perk_imports(MODULES[name]) & (CLI_MODULES - {name})


@pytest.mark.parametrize("name", sorted(set(MODULES) - CLI_LAYER))
def test_library_modules_import_no_command_line_module(name):
    assert not perk_imports(MODULES[name]) & CLI_MODULES


def test_the_configs_import_nothing_of_the_command_line_layer():
    assert not perk_imports(MODULES["perk.config"]) & CLI_LAYER


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_class_is_over_the_size_limit(name):
    tree = ast.parse(MODULES[name].read_text())
    sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert all(lines <= MAX_CLASS_LINES for lines in sizes.values()), sizes


REPOSITORY_PACKAGES = ("tools", "benchmarks", "tests")




RUNTIME_FILES = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "perk_kernels").rglob("*.py"))


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_packages_keep_their_boundaries(path):
    package = path.relative_to(PACKAGE.parent).parts[0]
    tops = {name.split(".")[0] for name in imports(path)}
    assert not tops & set(REPOSITORY_PACKAGES), f"{path} imports a repository folder, which is not installed"
    if package == "perk_kernels":
        assert "perk" not in tops
    else:
        assert all(name == "perk_kernels" for name in imports(path) if name.startswith("perk_kernels"))


def test_the_wheel_ships_the_runtime_packages_only():
    config = read_configuration(PACKAGE.parent / "pyproject.toml", expand=False)
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(str(PACKAGE.parent), include=include)
    assert {name.split(".")[0] for name in packages} == {"perk", "perk_kernels"}
