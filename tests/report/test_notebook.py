"""CI executes notebooks/paper_tables.ipynb: it must rebuild the tables from results/ through the public API."""
import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "paper_tables.ipynb"


def test_paper_tables_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = "".join(str(o) for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "Traceback" not in outputs
    assert "LEAP" in outputs  # the paper's tables were rendered
