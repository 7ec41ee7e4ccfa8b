import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the triton backend's kernels run in Triton's interpreter, which triton reads when
# its kernels are defined: set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Under pytest-xdist (make test runs one worker per core) the workers share the cores: each takes
# its share of torch's threads, so no worker's OpenMP team spins waiting for a core another holds.
# (OMP_NUM_THREADS too, so that the processes a test starts take the same share.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_share)
    os.environ["OMP_NUM_THREADS"] = str(_share)

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", deadline=None, max_examples=300, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def one_thread():
    """For tests of many tiny convolutions (conversion probes), which a second thread only slows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_choices():
    """``backend="auto"`` starts from no cached choice and the default mode, and leaves none behind."""
    from sparse_hetconv import autotune

    autotune.clear()
    yield
    autotune.clear()
    autotune.set_mode("confirm")
