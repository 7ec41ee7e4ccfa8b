"""The profiling notebooks run, in quick mode, on the current interpreter's kernel.

Each notebook is executed with nbclient under ``SPARSE_HETCONV_QUICK=1`` (its small setting) by
``benchmarks/notebooks.py``, the driver that also runs them in full mode; a cell that raises fails
the test with the cell's error. The kernel is named ``python3`` and is resolved, through a
temporary ``JUPYTER_PATH``, to this very interpreter (the project's .venv).
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

PUBLIC = ("sparse_hetconv", "sparse_hetconv.models", "sparse_hetconv.deploy", "sparse_hetconv.training")
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env():
    """A ``python3`` kernel of this interpreter, quick mode (``python -m benchmarks.notebooks``'s)."""
    from benchmarks.notebooks import this_kernel

    with this_kernel(quick=True):
        yield


def test_there_are_five_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_latency.ipynb", "02_memory.ipynb", "03_convert_trained_model.ipynb", "04_deploy.ipynb",
                     "05_reproduce.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, kernel_env, tmp_path):
    from benchmarks.notebooks import execute

    assert nbformat.read(path, as_version=4).metadata["kernelspec"]["name"] == "python3"
    notebook = execute(path, timeout=240, workdir=tmp_path)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} produced no plot"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "quick mode: True" in text, f"{path.name} did not run in quick mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs_and_plots(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code_cells if "import" in c.source and "QUICK" in c.source), \
        f"{path.name} was committed without its outputs"
    images = [o for c in code_cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} was committed without its plots"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_only_the_public_api(path):
    notebook = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    private = [line for line in source.splitlines() if "._" in line.replace("torch._", "")]
    assert not private, f"{path.name} reaches into a private name: {private[0].strip()}"
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    ours = [name for name in imports if name.startswith("sparse_hetconv")]
    assert ours and all(name in PUBLIC for name in ours), f"{path.name} imports {ours}; public: {PUBLIC}"
