"""Every notebook runs from a clean kernel against the installed package (nbclient)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("lm_eval")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_present():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_method_walkthrough.ipynb",
                                           "03_your_model.ipynb"]


def _shape(cell) -> list:
    """What a code cell shows, by kind: output types with their MIME types, a run of printed
    text counting once; warnings on stderr do not count."""
    shape = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            if out.get("name") == "stdout" and (not shape or shape[-1] != ("stream",)):
                shape.append(("stream",))
        else:
            shape.append((out["output_type"], *sorted(out.get("data", {}))))
    return shape


# Lines a notebook must print when run: the claims its text makes.
PRINTED = {"01_quickstart": ["identical logits after reload: True"]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    """Runs without error (execute() raises CellExecutionError on any), and every cell shows what
    the committed notebook shows: the same kinds of output, figures included."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MODEL_DIR", raising=False)
    committed = nbformat.read(path, as_version=4)
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    code = [c for c in book.cells if c.cell_type == "code"]
    expected = [c for c in committed.cells if c.cell_type == "code"]
    for i, (cell, want) in enumerate(zip(code, expected)):
        assert cell.get("execution_count") is not None, f"cell {i} did not run"
        assert _shape(cell) == _shape(want), f"cell {i} shows {_shape(cell)}, the notebook {_shape(want)}"
    printed = "".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("name") == "stdout")
    for line in PRINTED.get(path.stem, []):
        assert line in printed
