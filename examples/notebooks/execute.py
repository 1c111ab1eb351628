"""Run the example notebooks top to bottom at their full sizes and save them with their outputs, so that they
read on a code host: ``python examples/notebooks/execute.py [NAME.ipynb ...]`` (a few minutes on 2 CPU cores).
The tests run them at small sizes without writing them."""
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> None:
    os.environ.pop("GEOMOPT_NB_STEPS", None)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    for name in names or sorted(p.name for p in HERE.glob("*.ipynb")):
        path = HERE / name
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, path)
        print(f"{name}: executed in {time.perf_counter() - start:.0f} s, saved with its outputs")


if __name__ == "__main__":
    main(sys.argv[1:])
