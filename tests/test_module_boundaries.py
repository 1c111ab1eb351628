"""Who may reach into whom: the growth package knows nothing of the optimizers' internals (it calls their public
``prepare_resize`` / ``resize_state``), the optimizers use only the growth package's public resize helpers, and no
architecture module imports another's private helpers."""
import ast
from pathlib import Path

import pytest

import geomopt

ROOT = Path(geomopt.__file__).parent


def sources(folder):
    return sorted((ROOT / folder).glob("*.py"))


def imports(path):
    """(module, names) of every ``from ... import ...`` in ``path``, the module resolved against the package."""
    tree = ast.parse(path.read_text())
    here = ["geomopt", *path.parent.relative_to(ROOT).parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
    return out


def private_attributes(path):
    """``x._name`` where x is not ``self`` / ``cls`` (dunders aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("path", sources("grow"), ids=lambda p: p.name)
def test_growth_imports_no_optimizer_and_calls_nothing_private(path):
    assert not [m for m, _ in imports(path) if m.startswith("geomopt.optim")]
    assert private_attributes(path) == []


@pytest.mark.parametrize("path", sources("grow"), ids=lambda p: p.name)
def test_architecture_modules_import_no_private_helpers(path):
    assert not [(m, n) for m, names in imports(path) if m.startswith("geomopt.grow") for n in names
                if n.startswith("_")]


@pytest.mark.parametrize("path", sources("optim"), ids=lambda p: p.name)
def test_optimizers_use_only_the_public_resize_helpers(path):
    from geomopt.grow import resize
    for module, names in imports(path):
        if module.startswith("geomopt.grow"):
            assert module == "geomopt.grow.resize" and set(names) <= set(resize.__all__), (module, names)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The helpers find a private call and an import across the boundary when there is one."""
    (tmp_path / "grow").mkdir()
    bad = tmp_path / "grow" / "bad.py"
    bad.write_text("from ..optim.poet import POETOptimizer\n\ndef f(opt):\n    opt._build_factors()\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert imports(bad) == [("geomopt.optim.poet", ["POETOptimizer"])]
        assert private_attributes(bad) == ["bad.py:4: ._build_factors"]
    finally:
        ROOT = old
