"""DistributedDataParallel over gloo: 2 processes on this machine train the sparse VGG-16.

After 3 SGD steps (momentum 0.9, weight decay 5e-4), each rank having fed half of each batch, the
weights must equal those of single-process training on the whole batches. BatchNorm is where the
two can honestly differ: in train mode each process normalises with the statistics of its own half
(SyncBatchNorm would share them, but it needs CUDA: it refuses CPU tensors), so two setups are
checked, each against the single-process training that computes the same function:

* **frozen BatchNorm** (BatchNorm layers in eval mode, as when fine-tuning): every sample is
  processed independently, DDP's averaged gradient is exactly the gradient of the mean loss over
  the whole batch, and the reference is plain training on the concatenated batch;
* **train-mode BatchNorm**: the reference runs the two halves through the model separately (each
  with its own batch statistics, a "ghost batch") and averages the two losses; DDP broadcasts rank
  0's running statistics before every forward, so the reference keeps rank 0's half's update of
  them.

Tolerance: the two sides add the same gradients in a different order (two batches of 2 against
one of 4, gloo's reduction). With frozen BatchNorm that is all: float32, rtol 1e-4 and atol 1e-5
on every parameter and buffer after 3 steps (measured: at most 4e-9). Train-mode BatchNorm over
batches of 2 is violently ill-conditioned (in the last blocks it normalises 2 to 8 values per
channel): a rounding difference grows about a million-fold in 3 steps, in float32 to 2e-2, so that
scenario runs in float64, where it stays near 1e-8 relative: rtol 1e-6, atol 1e-8. DDP runs with
``find_unused_parameters=False``, so a parameter without a gradient would raise in the next step.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from sparse_hetconv import autotune
from sparse_hetconv.models import vgg16_cifar

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 3
PER_RANK = 2
# (form, BatchNorm mode, dtype): see the module notes for why train-mode BatchNorm runs in float64.
SCENARIOS = [("sparse", "frozen", torch.float32), ("sparse", "train", torch.float64), ("masked", "frozen", torch.float32)]
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-6, "atol": 1e-8}}
TIMEOUT_S = 240


def build(form: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return vgg16_cifar(part=4, form=form).to(dtype)


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=generator, dtype=dtype),
             torch.randint(0, 10, (WORLD * PER_RANK,), generator=generator)) for _ in range(STEPS)]


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def set_mode(model: nn.Module, bn: str) -> None:
    model.train()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    # backend="auto" by its cost model: the same backends in both ranks and the reference (one-off
    # timings could choose differently per process), and no timing of VGG-16's layers per rank
    autotune.set_mode("model")
    if sys.platform.startswith("linux"):  # both ranks on this machine: talk over the loopback device
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        for form, bn, dtype in SCENARIOS:
            model = build(form, dtype)
            ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
            set_mode(ddp, bn)
            opt = optimizer(ddp.parameters())
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            for x, y in batches(dtype):
                opt.zero_grad()
                F.cross_entropy(ddp(x[mine]), y[mine]).backward()
                missing = [name for name, p in model.named_parameters() if p.grad is None]
                if missing:
                    raise RuntimeError(f"rank {rank}: no gradient for {missing}")
                opt.step()
            if rank == 0:
                torch.save(model.state_dict(), Path(out_dir) / f"{form}-{bn}.pt")
    finally:
        dist.destroy_process_group()


@autotune.mode("model")
def single_process(form: str, bn: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = build(form, dtype)
    set_mode(model, bn)
    opt = optimizer(model.parameters())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for x, y in batches(dtype):
        opt.zero_grad()
        if bn == "frozen":
            F.cross_entropy(model(x), y).backward()
        else:
            # The mean of the halves' losses. Rank 1's half first, then rank 0's from the same
            # running statistics (DDP broadcasts rank 0's before each forward), so that rank 0's
            # update of them is the one kept.
            saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
            for rank in reversed(range(WORLD)):
                for m, state in zip(norms, saved):
                    m.load_state_dict(state)
                half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                (F.cross_entropy(model(x[half]), y[half]) / WORLD).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    for form, bn, dtype in SCENARIOS:
        ddp_state = torch.load(tmp_path / f"{form}-{bn}.pt", weights_only=True)
        reference = single_process(form, bn, dtype)
        assert ddp_state.keys() == reference.keys()
        initial = build(form, dtype).state_dict()
        for key, expected in reference.items():
            if expected.is_floating_point():
                assert not torch.equal(expected, initial[key]) or "running" in key, f"{key} did not train"
            assert_close(ddp_state[key], expected, f"{form}, {bn} BatchNorm, {dtype}: {key} after {STEPS} steps",
                         **TOLERANCE[dtype])
