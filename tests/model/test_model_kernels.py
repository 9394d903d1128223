"""The DETR model with the attention and projection kernels equals the model with the references.

A tiny DETR (d_model 32, 2 heads, resnet18, small padded images) runs under backend("kernel") and
backend("reference") with the same weights; outputs, losses and every parameter gradient are checked against the
same model in float64 with the low-precision criterion of tests/helpers.py (the kernel model's error
within a small multiple of the reference model's own error). Launch counters prove the kernels actually ran.
"""

import copy

import pytest
import torch

from detr_fast import DetrConfig, DetrForObjectDetection, backend
from detr_fast.kernels import attention as attention_kernels
from detr_fast.kernels import qkv_projection as qkv_projection_kernels

from ..helpers import assert_within_low_precision, padded_batch, random_labels, tiny_config_kwargs

ENCODER_LAYERS, DECODER_LAYERS = 2, 2
# Per forward: one attention per encoder layer and two per decoder layer; one projection per encoder layer and
# three per decoder layer (self-attention qkv, cross-attention q, cross-attention kv).
ATTENTIONS = ENCODER_LAYERS + 2 * DECODER_LAYERS
PROJECTIONS = ENCODER_LAYERS + 3 * DECODER_LAYERS
IMAGE_SIZES = ((160, 224), (128, 192), (96, 224))  # 5 x 7 feature map, two images padded differently


def tiny_model(device, **overrides):
    fields = dict(
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_layers=ENCODER_LAYERS,
        decoder_layers=DECODER_LAYERS,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
    )
    fields.update(overrides)
    config = DetrConfig(**tiny_config_kwargs("resnet18", auxiliary_loss=True, **fields))
    return DetrForObjectDetection(config).to(device)


@pytest.fixture
def launches(monkeypatch):
    """Counts of kernel launches by name while the test runs."""
    counts = {"attention_forward": 0, "attention_backward": 0, "qkv_projection_forward": 0}

    def counting(module, name):
        launch = getattr(module, name)

        def wrapper(*args):
            counts[name] += 1
            return launch(*args)

        monkeypatch.setattr(module, name, wrapper)

    counting(attention_kernels, "attention_forward")
    counting(attention_kernels, "attention_backward")
    counting(qkv_projection_kernels, "qkv_projection_forward")
    return counts


def outputs_of(model, pixel_values, pixel_mask, labels):
    out = model(pixel_values, pixel_mask, labels=labels)
    values = {
        "logits": out.logits,
        "pred_boxes": out.pred_boxes,
        "loss": out.loss,
        "memory": out.encoder_last_hidden_state,
    }
    values.update({f"loss_dict.{key}": value for key, value in out.loss_dict.items()})
    return values


def test_outputs_and_loss_equal_the_reference_model(device, launches):
    model = tiny_model(device).eval()
    model64 = copy.deepcopy(model).double()
    pixel_values, pixel_mask = padded_batch(device, IMAGE_SIZES)
    labels = random_labels([3, 0, 2], 7, device)
    labels64 = [{"class_labels": t["class_labels"], "boxes": t["boxes"].double()} for t in labels]
    with torch.no_grad():
        with backend("kernel"):
            got = outputs_of(model, pixel_values, pixel_mask, labels)
        assert launches == {
            "attention_forward": ATTENTIONS,
            "attention_backward": 0,
            "qkv_projection_forward": PROJECTIONS,
        }
        with backend("reference"):
            expected = outputs_of(model, pixel_values, pixel_mask, labels)
            exact = outputs_of(model64, pixel_values.double(), pixel_mask, labels64)
    assert list(got) == list(expected)
    for name in got:
        assert_within_low_precision(name, got[name], expected[name], exact[name], torch.float32)


def test_gradients_equal_the_reference_model(device, launches):
    model = tiny_model(device).train()
    model64 = copy.deepcopy(model).double()
    pixel_values, pixel_mask = padded_batch(device, IMAGE_SIZES)
    labels = random_labels([2, 4, 1], 7, device)
    labels64 = [{"class_labels": t["class_labels"], "boxes": t["boxes"].double()} for t in labels]

    def gradients(model, pixel_values, labels):
        model.zero_grad()
        loss = model(pixel_values, pixel_mask, labels=labels).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with backend("kernel"):
        loss, grads = gradients(model, pixel_values, labels)
    assert launches == {
        "attention_forward": ATTENTIONS,
        "attention_backward": ATTENTIONS,
        "qkv_projection_forward": PROJECTIONS,
    }
    with backend("reference"):
        loss_reference, grads_reference = gradients(model, pixel_values, labels)
        loss_exact, grads_exact = gradients(model64, pixel_values.double(), labels64)
    assert_within_low_precision("loss", loss, loss_reference, loss_exact, torch.float32)
    assert grads.keys() == grads_reference.keys() == grads_exact.keys()
    assert any(name.endswith("self_attn.q_proj.weight") for name in grads)
    # Gradients that are zero up to rounding (softmax cancels the key bias exactly) get their floor from the
    # largest gradient in the model rather than from their own float noise.
    largest = max(g.abs().max().item() for g in grads_exact.values())
    for name, grad in grads.items():
        assert_within_low_precision(name, grad, grads_reference[name], grads_exact[name], torch.float32, largest)


def test_training_with_attention_dropout_is_reproducible(device):
    """attention_dropout > 0 uses the kernels' in-kernel dropout: finite loss and gradients, the same under the
    same torch seed, and a loss that differs from the model's without dropout (eval)."""
    # One layer each, two images, 2 x 3 feature maps: Philox in Triton's interpreter is slow.
    model = tiny_model(device, attention_dropout=0.3, encoder_layers=1, decoder_layers=1)
    pixel_values, pixel_mask = padded_batch(device, ((64, 96), (48, 80)))
    labels = random_labels([1, 2], 7, device)

    def step(seed):
        torch.manual_seed(seed)
        model.zero_grad()
        with backend("kernel"):
            loss = model(pixel_values, pixel_mask, labels=labels).loss
            loss.backward()
        return loss.detach(), model.model.encoder.layers[0].self_attn.q_proj.weight.grad.clone()

    model.train()
    first, again = step(5), step(5)
    model.eval()
    with torch.no_grad(), backend("kernel"):
        loss_without_dropout = model(pixel_values, pixel_mask, labels=labels).loss
    assert torch.isfinite(first[0]) and torch.isfinite(first[1]).all()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], loss_without_dropout)


def test_model_compiles_whole_with_the_kernels(device):
    """torch.compile(fullgraph=True) traces backbone + transformer with the kernel ops as single nodes (no graph
    break) and matches eager, forward and backward. On CPU the graph runs through aot_eager: inductor's CPU
    backend would spend minutes compiling the backbone, and the op nodes are the same either way."""
    model = tiny_model(device, encoder_layers=1, decoder_layers=1).train()
    pixel_values, pixel_mask = padded_batch(device, ((64, 96), (48, 80)))

    def run(transformer):
        model.zero_grad()
        out = transformer(pixel_values, pixel_mask)  # DetrModelOutput, a pytree the graph returns whole
        hidden, memory = out.last_hidden_state, out.encoder_last_hidden_state
        (hidden.square().sum() + memory.square().sum()).backward()
        return hidden.detach(), model.model.encoder.layers[0].self_attn.q_proj.weight.grad.clone()

    with backend("kernel"):
        eager = run(model.model)
        compiler = "inductor" if device.type == "cuda" else "aot_eager"
        compiled = run(torch.compile(model.model, fullgraph=True, backend=compiler))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_autocast_bf16_training_step_matches_the_reference(device, launches):
    if device.type != "cuda":
        pytest.skip("bf16 autocast needs cuda (the interpreter has no bf16)")
    model = tiny_model(device).train()
    pixel_values, pixel_mask = padded_batch(device, IMAGE_SIZES)
    labels = random_labels([2, 4, 1], 7, device)

    def logits_and_grad(mode, autocast):
        model.zero_grad()
        with backend(mode), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(pixel_values, pixel_mask, labels=labels)
            out.loss.backward()
        return out.logits.float(), model.model.encoder.layers[0].self_attn.q_proj.weight.grad.clone()

    logits, grad = logits_and_grad("kernel", True)
    assert launches["attention_forward"] == ATTENTIONS and launches["qkv_projection_forward"] == PROJECTIONS
    logits_reference, grad_reference = logits_and_grad("reference", True)
    logits_fp32, grad_fp32 = logits_and_grad("reference", False)
    assert_within_low_precision(
        "logits (bf16 autocast)", logits.bfloat16(), logits_reference.bfloat16(), logits_fp32.double(), torch.bfloat16
    )
    assert_within_low_precision(
        "grad (bf16 autocast)", grad.bfloat16(), grad_reference.bfloat16(), grad_fp32.double(), torch.bfloat16
    )
