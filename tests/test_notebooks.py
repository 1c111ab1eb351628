"""The example notebooks run top to bottom (small sizes: GEOMOPT_NB_STEPS=20) and draw their plots."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "examples" / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "growth.ipynb"])
def test_notebook_runs_and_plots(name, monkeypatch, tmp_path):
    monkeypatch.setenv("GEOMOPT_NB_STEPS", "20")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve was drawn
    if name == "growth.ipynb":
        text = "".join(o.get("text", "") for o in outputs)
        assert "grew after step 10" in text


@pytest.mark.parametrize("name", ["quickstart.ipynb", "growth.ipynb"])
def test_notebooks_are_committed_with_their_outputs(name):
    """They read on a code host: every code cell ran, in order, without an error, and the plot is saved
    (``python examples/notebooks/execute.py`` refreshes them)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
