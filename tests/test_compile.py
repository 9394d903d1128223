"""torch.compile of a whole training step (model forward + matching + criterion): no graph break, no host sync,
the same loss as eager, one graph across image sizes with dynamic=True; on CUDA the criterion is capturable in a
CUDA graph. The same for the segmentation model's step, mask loss included. On CPU the step runs the reference ops,
the mask loss's CPU path and the extension's solver; on CUDA the kernels."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from detr_fast import DetrConfig, DetrForObjectDetection, DetrForSegmentation, pad_targets

from .helpers import padded_batch, random_cxcywh, random_labels


def tiny_model(device, architecture=DetrForObjectDetection, **overrides):
    settings = dict(
        backbone="resnet18",
        num_labels=7,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=8,
        auxiliary_loss=True,
        dropout=0.0,
    )
    return architecture(DetrConfig(**{**settings, **overrides})).to(device).train()


def make_step(model):
    def step(pixel_values, pixel_mask, targets):
        return model(pixel_values, pixel_mask, labels=targets).loss

    return step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def batch(device, size=(72, 80), masks=False):
    pixel_values, pixel_mask = padded_batch(device, sizes=(size, (48, 56)))
    labels = random_labels([2, 3], 7, device)
    if masks:
        for target in labels:
            target["masks"] = torch.rand(len(target["boxes"]), *size, device=device) > 0.5
    return pixel_values, pixel_mask, pad_targets(labels)


def test_step_has_no_graph_break(device):
    explanation = torch._dynamo.explain(make_step(tiny_model(device)))(*batch(device))
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def assert_compiled_step_equals_eager(model, inputs) -> dict:
    """The step compiled whole (aot_eager) gives eager's loss and gradients; returns eager's gradients."""
    step = make_step(model)
    eager = step(*inputs)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6, msg=name)
    return eager_grads


def test_compiled_step_equals_eager_with_gradients(device):
    assert_compiled_step_equals_eager(tiny_model(device), batch(device))


def test_segmentation_step_compiles_whole_and_equals_eager(device):
    model = tiny_model(device, DetrForSegmentation, encoder_attention_heads=8)  # mask head width d + heads: 40
    inputs = batch(device, masks=True)
    step = make_step(model)
    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    torch._dynamo.reset()
    eager_grads = assert_compiled_step_equals_eager(model, inputs)
    assert any(name.startswith("mask_head.") for name in eager_grads)


@pytest.mark.slow
def test_inductor_step_equals_eager(device):
    model = tiny_model(device)
    inputs = batch(device)
    step = make_step(model)
    with torch.no_grad():
        eager = step(*inputs)
        compiled = torch.compile(step, fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_compile_once_across_image_sizes(device):
    model = tiny_model(device)
    compiled = torch.compile(make_step(model), fullgraph=True, backend="aot_eager", dynamic=True)
    losses = []
    with torch.no_grad():  # recompilation is decided by dynamo's guards; skipping the backward graph saves time
        for size in ((72, 80), (96, 64), (56, 88)):
            losses.append(compiled(*batch(device, size)))
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and sync debug mode need a CUDA device")
def test_criterion_is_cuda_graph_capturable_and_step_sync_free(device):
    if device.type != "cuda":
        pytest.skip("runs in the GPU suite (DETR_FAST_TEST_DEVICE=cuda)")
    model = tiny_model(device)
    pixel_values, pixel_mask, targets = batch(device)
    logits = torch.randn(2, 2, 8, 8, device=device)
    boxes = random_cxcywh(2, 2, 8, device=device, center_low=0.2, center_width=0.5, size_low=0.2, size_width=0.5)
    stream = torch.cuda.Stream()  # warm-up on a side stream, outside the capture
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.criterion(logits, boxes, targets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss, _, captured_status = model.criterion(logits, boxes, targets)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    expected_loss, _, expected_status = model.criterion(logits, boxes, targets)
    torch.testing.assert_close(captured_loss, expected_loss)
    assert torch.equal(captured_status, expected_status)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(pixel_values, pixel_mask, labels=targets).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
