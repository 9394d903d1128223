"""The benchmarks as pytest-benchmark tests, at one DETR-sized case per op, on the CPU or a GPU:

    python -m pytest bench/test_benchmarks.py --benchmark-only [--benchmark-json out.json]
    DETR_FAST_BENCH_DEVICE=cuda python -m pytest bench/test_benchmarks.py --benchmark-only

Each op is timed on its fast path and its reference (the fast path of a Triton op exists on CUDA only). Not part
of `make test`: the test suite lives in tests/, and timings belong to benchmarks.
"""

import os

import pytest
import torch

import detr_fast
from detr_fast import ops, pad_targets

pytest.importorskip("pytest_benchmark")
DEVICE = torch.device(os.environ.get("DETR_FAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
BACKENDS = ["auto", "reference"]


def synchronized(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def detr_batch(layers=6, batch=8, queries=100, classes=92, max_targets=30):
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, max_targets, (batch,), generator=generator).tolist()
    labels = [
        {"class_labels": torch.randint(0, classes - 1, (m,), generator=generator),
         "boxes": torch.cat([torch.rand(m, 2, generator=generator) * 0.6 + 0.2,
                             torch.rand(m, 2, generator=generator) * 0.3 + 0.05], -1)}
        for m in counts
    ]
    targets = {k: v.to(DEVICE) for k, v in pad_targets(labels).items()}
    logits = torch.randn(layers, batch, queries, classes, generator=generator).to(DEVICE)
    boxes = (torch.rand(layers, batch, queries, 4, generator=generator) * 0.5 + 0.2).to(DEVICE)
    return logits, boxes, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_cost(benchmark, backend):
    logits, boxes, targets = detr_batch()
    with detr_fast.backend(backend):
        cost = benchmark(synchronized(
            lambda: ops.match_cost(logits, boxes, targets["class_labels"], targets["boxes"], targets["mask"])
        ))
    assert cost.shape == (6, 8, 100, targets["mask"].shape[1]) and torch.isinf(cost[:, ~targets["mask"]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_assignment(benchmark, backend):
    logits, boxes, targets = detr_batch()
    cost = ops.match_cost(logits, boxes, targets["class_labels"], targets["boxes"], targets["mask"])
    num_targets = targets["mask"].sum(-1)
    with detr_fast.backend(backend):
        assignment, status = benchmark(synchronized(lambda: ops.linear_assignment(cost, num_targets, strict=False)))
    assert (status == 0).all() and ((assignment >= 0).sum(-1) == num_targets).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_loss_forward_backward(benchmark, backend):
    _, boxes, _ = detr_batch()
    pred = boxes.flatten(1, 2).requires_grad_()
    tgt = torch.rand_like(pred) * 0.3 + 0.3
    weight = (torch.rand(pred.shape[:-1], device=DEVICE) > 0.8).float()

    def step():
        l1, giou = ops.box_loss(pred, tgt, weight)
        return torch.autograd.grad((l1 + giou).sum(), pred)

    with detr_fast.backend(backend):
        benchmark(synchronized(step))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_attention_forward_backward(benchmark, backend):
    batch, length, heads, dim = (8, 1050, 8, 32) if DEVICE.type == "cuda" else (2, 300, 8, 32)
    qkv = torch.randn(batch, length, 3, heads, dim, device=DEVICE, requires_grad=True)
    mask = torch.rand(batch, length, device=DEVICE) < 0.2

    def step():
        out = ops.attention(*qkv.unbind(2), key_padding_mask=mask)
        return torch.autograd.grad(out.sum(), qkv)

    with detr_fast.backend(backend):
        benchmark(synchronized(step))
