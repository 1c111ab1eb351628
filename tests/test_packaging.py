"""What a team checks before adopting the package: the licence ships and is in the metadata, the version has one
source, the declared dependencies are the ones the package imports, and the optional kernels say what they need."""
import ast
import importlib.metadata
import os
import subprocess
import sys

import geomopt

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_licence_file_and_metadata():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = importlib.metadata.metadata("geomopt")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])


def test_one_version_source():
    assert importlib.metadata.version("geomopt") == geomopt.__version__


def _imported_top_level(folder: str) -> set[str]:
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for fn in files:
            if fn.endswith(".py"):
                with open(os.path.join(dirpath, fn)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return names


def test_every_required_dependency_is_imported():
    """A dependency that nothing in the package imports is not declared (the required ones; extras are optional)."""
    required = [r for r in importlib.metadata.requires("geomopt") if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in required}
    imported = _imported_top_level("geomopt")
    assert names and names <= imported, names - imported


def test_kernels_without_triton_say_what_they_need():
    code = "import sys; sys.modules['triton'] = None; import geomopt.kernels"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(ROOT))
    assert out.returncode != 0
    assert "geomopt.kernels needs triton" in out.stderr and "pip install 'geomopt[triton]'" in out.stderr


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists the packages by hand: a folder of the package with an __init__.py that is not listed would be
    missing from the wheel (the kernels' folders, say)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "geomopt"))
             if "__init__.py" in files}
    assert found == listed, (found - listed, listed - found)
