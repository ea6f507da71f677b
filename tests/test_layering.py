"""The layering of perk's modules, read from their imports (``ast``, nothing is imported).

* A command-line module (``python -m perk.X``) imports no other command-line module: what they
  share lives in library modules (:mod:`perk.runs`, :mod:`perk.methods`, ...) or in
  :mod:`perk.cli`, the argument-parsing helpers.
* A library module imports no command-line module.
* :mod:`perk.config` and :mod:`perk.fields` import nothing of the command-line layer, not even
  :mod:`perk.cli`.
* No class is longer than a newcomer can hold in mind (``MAX_CLASS_LINES``): the engine is split
  into the adapted model, the inner loop, the meta-gradient modes and PERK's own meta-parameters.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "perk"
CLI_MODULES = {"perk.train", "perk.eval", "perk.encode", "perk.data", "perk.check_meta_grad"}
CLI_LAYER = CLI_MODULES | {"perk.cli"}
MAX_CLASS_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def perk_imports(path: Path) -> set[str]:
    """Every ``perk`` module ``path`` imports, at any depth of the file (``from perk import eval``
    counts as ``perk.eval``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


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


@pytest.mark.parametrize("name", ["perk.config", "perk.fields"])
def test_configs_import_nothing_of_the_command_line_layer(name):
    assert not perk_imports(MODULES[name]) & CLI_LAYER


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_class_is_over_the_size_limit(name):
    tree = ast.parse(MODULES[name].read_text())
    sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert all(lines <= MAX_CLASS_LINES for lines in sizes.values()), sizes
