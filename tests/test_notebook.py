"""notebooks/scaling_laws.ipynb executes top to bottom on the committed sweep results (so it cannot rot)."""

import os

import nbformat
from nbclient import NotebookClient

from helpers import ROOT


def test_scaling_notebook_executes():
    nb = nbformat.read(ROOT / "notebooks" / "scaling_laws.ipynb", as_version=4)
    os.environ["GPTJAX_BOOTSTRAP"] = "20"  # the kernel inherits the environment; keep the test fast
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.pop("GPTJAX_BOOTSTRAP", None)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "approach 3 (Huber/L-BFGS): E=" in text and "approach 2 (IsoFLOP)" in text
    assert "measured" in text and "WSD points" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
