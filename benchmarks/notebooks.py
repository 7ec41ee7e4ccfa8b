"""Execute the notebooks in place, in full mode (their committed outputs) or quick mode.

``python -m benchmarks.notebooks`` runs ``notebooks/*.ipynb`` one after the other on a kernel of
this very interpreter (the project's .venv, whatever kernels Jupyter has installed) and writes each
back with its outputs; ``--quick`` sets ``SPARSE_HETCONV_QUICK=1`` (the small setting the tests
run), and names select notebooks (``python -m benchmarks.notebooks 01_latency 04_deploy``). Each
cell runs in a temporary folder and may take ``--timeout`` seconds. Run it on a quiet machine: the
notebooks time things. Full mode takes about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


@contextlib.contextmanager
def this_kernel(quick: bool) -> Iterator[None]:
    """A ``python3`` kernelspec running this interpreter, first on ``JUPYTER_PATH``, importing this
    checkout's package (first on ``PYTHONPATH``), and the mode's environment; all restored afterwards."""
    saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "SPARSE_HETCONV_QUICK", "MPLBACKEND", "PYTHONPATH",
                                                    "SPARSE_HETCONV_REPRODUCE")}
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / "python3"
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (sparse_hetconv)", "language": "python"}))
        os.environ["JUPYTER_PATH"] = root + os.pathsep + os.environ.get("JUPYTER_PATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [saved["PYTHONPATH"]] if p])
        os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend puts the plots into the outputs
        os.environ.pop("SPARSE_HETCONV_QUICK", None)
        # 05 reads make reproduce's results (the full run's, or the committed quick run's)
        os.environ.setdefault("SPARSE_HETCONV_REPRODUCE", str(REPO / "benchmarks" / "results" / "reproduce.json"))
        if quick:
            os.environ["SPARSE_HETCONV_QUICK"] = "1"
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def execute(path: Path, timeout: int = 1800, workdir: Path | None = None):
    """Run one notebook (inside :func:`this_kernel`) and return it with its outputs; a cell that
    raises raises ``nbclient.exceptions.CellExecutionError``."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                                         resources={"metadata": {"path": str(workdir or tmp)}})
        client.execute()
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default all), e.g. 01_latency")
    parser.add_argument("--quick", action="store_true", help="the small setting (SPARSE_HETCONV_QUICK=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default %(default)s)")
    args = parser.parse_args(argv)
    import nbformat

    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    unknown = sorted(set(args.names) - {p.stem for p in paths})
    if unknown:
        parser.error(f"no notebook named {', '.join(unknown)}; there are {', '.join(p.stem for p in paths)}")
    paths = [p for p in paths if not args.names or p.stem in args.names]
    with this_kernel(args.quick):
        for path in paths:
            start = time.perf_counter()
            print(f"{path.name}: running ({'quick' if args.quick else 'full'} mode) ...", flush=True)
            notebook = execute(path, args.timeout)  # a cell that fails leaves the file as it was
            partial = path.with_name(f".{path.name}.tmp")
            nbformat.write(notebook, partial)
            os.replace(partial, path)
            print(f"{path.name}: written in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
