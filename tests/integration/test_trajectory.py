"""Masked and sparse forms train identically: same losses step by step, same final weights."""

import pytest
import torch
from torch import nn

from sparse_hetconv import MaskedHetConv2d, to_masked, to_sparse


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        MaskedHetConv2d(16, 32, part=4, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        # No BatchNorm after the biased layer: BN cancels a bias's gradient, leaving rounding noise
        # that Adam would amplify into a meaningless comparison.
        MaskedHetConv2d(32, 32, part=2, bias=True), nn.ReLU(),
        MaskedHetConv2d(32, 32, part=8, kernel_size=5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _train(model, batches, optimizer):
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["auto", "dense", "grouped", "blocked", "torch_sparse"])
@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-4),
], ids=["sgd", "adamw"])
@pytest.mark.slow
def test_masked_and_sparse_training_trajectories_are_equal(backend, make_optimizer):
    torch.manual_seed(0)
    masked = _net()
    sparse = to_sparse(masked, backend=backend)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 12, 12, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(20)]
    masked_losses = _train(masked, batches, make_optimizer(masked.parameters()))
    sparse_losses = _train(sparse, batches, make_optimizer(sparse.parameters()))
    for step, (a, b) in enumerate(zip(masked_losses, sparse_losses)):
        assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), f"step {step}: masked loss {a} != sparse loss {b}"
    final_masked, trained_back = masked.state_dict(), to_masked(sparse).state_dict()
    for name, value in final_masked.items():
        other = trained_back[name]
        if value.is_floating_point():
            error = (other - value).norm() / value.norm().clamp(min=1e-12)
            assert error <= 1e-5, f"{name}: relative difference {error:.2e} after 20 steps"
        else:
            assert torch.equal(other, value), name
