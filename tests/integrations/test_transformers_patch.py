"""detr_fast.integrations.transformers.patch on transformers' own DetrForObjectDetection: the same outputs, loss
dict and gradients; our ops really run; unpatch restores; the loss equals transformers'; a Trainer trains the
patched model."""

import pytest
import torch

import detr_fast.ops
from detr_fast.integrations.transformers import make_loss_function, patch, unpatch
from detr_fast.loss import DetrLoss

from ..helpers import (
    assert_outputs_equal,
    padded_batch,
    random_cxcywh,
    random_labels,
    relative_error,
    tiny_config_kwargs,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers

TOLERANCE = 1e-5  # relative, float32


def their_model(device, auxiliary_loss=True, **overrides):
    config = transformers.DetrConfig(**tiny_config_kwargs("resnet18", auxiliary_loss, **overrides))
    model = transformers.DetrForObjectDetection(config).to(device)
    with torch.no_grad():
        # DETR's N(0, 1) query init instead of transformers' std 0.02, so that matching costs do not tie to float
        # rounding (see tests/model/test_parity_transformers.py).
        model.model.query_position_embeddings.weight.normal_()
    return model


def run(model, device, counts=(3, 0, 5)):
    """Forward with labels and backward; returns (output, {name: gradient})."""
    torch.manual_seed(0)
    pixel_values, pixel_mask = padded_batch(device)
    labels = random_labels(list(counts), 7, device)
    model.zero_grad()
    output = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["last-layer", "aux"])
def test_patched_model_equals_the_original(device, auxiliary_loss):
    model = their_model(device, auxiliary_loss).train()  # dropout is 0 in the tiny config
    expected, expected_grads = run(model, device)
    patch(model)
    got, grads = run(model, device)
    assert_outputs_equal(got, expected, TOLERANCE)
    assert len(got.auxiliary_outputs or []) == (2 if auxiliary_loss else 0)
    assert grads.keys() == expected_grads.keys()
    floor = 1e-4 * max(g.abs().max().item() for g in expected_grads.values())  # see the parity tests
    for name, gradient in expected_grads.items():
        assert relative_error(grads[name], gradient, floor) < 1e-4, name

    unpatch(model)
    restored, restored_grads = run(model, device)
    assert torch.equal(restored.logits, expected.logits) and torch.equal(restored.loss, expected.loss)
    assert all(torch.equal(restored_grads[n], g) for n, g in expected_grads.items())


def test_the_patched_model_runs_our_attention_and_criterion(device, monkeypatch):
    model = their_model(device).eval()
    calls = {"attention": 0, "qkv_projection": 0, "criterion": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(detr_fast.ops, "attention", counting("attention", detr_fast.ops.attention))
    monkeypatch.setattr(detr_fast.ops, "qkv_projection", counting("qkv_projection", detr_fast.ops.qkv_projection))
    monkeypatch.setattr(DetrLoss, "forward", counting("criterion", DetrLoss.forward))
    assert patch(model) is model and patch(model) is model  # patching twice is patching once
    with torch.no_grad():
        run_labels = random_labels([2, 1, 1], 7, device)
        model(*padded_batch(device), labels=run_labels)
    # 2 encoder self-attentions + 3 decoder layers x (self + cross); cross-attention projects q and kv apart.
    assert calls == {"attention": 2 + 3 * 2, "qkv_projection": 2 + 3 * 3, "criterion": 1}


def test_patch_refuses_what_it_cannot_patch(device):
    with pytest.raises(TypeError, match="no transformers DETR attention module"):
        patch(torch.nn.Linear(2, 2))
    base = transformers.DetrModel(transformers.DetrConfig(**tiny_config_kwargs()))
    with pytest.raises(TypeError, match="criterion=True needs a DetrForObjectDetection"):
        patch(base)
    patch(base, criterion=False)


@pytest.mark.parametrize("requested_by", ["argument", "config"])
def test_the_patched_model_returns_attention_weights(device, requested_by):
    """output_attentions (an argument, or set in the config) takes the reference attention for that call: the
    weights equal the unpatched eager model's, never an empty tuple."""
    config = transformers.DetrConfig(**tiny_config_kwargs(), attn_implementation="eager")
    model = transformers.DetrModel(config).to(device).eval()
    batch = padded_batch(device)
    kwargs = {"output_attentions": True} if requested_by == "argument" else {}
    model.config.output_attentions = requested_by == "config"
    with torch.no_grad():
        expected = model(*batch, **kwargs)
        patch(model, criterion=False)
        got = model(*batch, **kwargs)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(getattr(got, name)) == len(getattr(expected, name)) > 0, name
        for ours, theirs in zip(getattr(got, name), getattr(expected, name)):
            assert relative_error(ours, theirs) < TOLERANCE, name


def test_our_loss_function_equals_transformers_on_every_layer():
    """The loss function `patch` installs, on DETR-sized predictions (6 layers x 8 images x 100 queries, 91
    classes): the same loss and keys as transformers' (its speed is measured by bench/train_step.py)."""
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    config = transformers.DetrConfig(num_labels=91, auxiliary_loss=True, use_pretrained_backbone=False)
    ours = make_loss_function(type("Model", (), {"config": config}))
    layers, batch, queries = 6, 8, 100
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(layers, batch, queries, 92, generator=generator).requires_grad_()
    boxes = random_cxcywh(
        layers, batch, queries, device="cpu", center_low=0.1, center_width=0.8, generator=generator
    ).requires_grad_()
    labels = random_labels([3, 20, 7, 12, 1, 25, 9, 14], 91, "cpu")

    def step(loss_function):
        loss, loss_dict, _ = loss_function(logits[-1], labels, "cpu", boxes[-1], config, logits, boxes)
        loss.backward()
        return loss, loss_dict

    (theirs, their_dict), (mine, my_dict) = step(ForObjectDetectionLoss), step(ours)
    assert relative_error(mine, theirs) < TOLERANCE and list(my_dict) == list(their_dict)
    for key, value in their_dict.items():
        assert relative_error(my_dict[key], value) < TOLERANCE, key


def test_a_trainer_trains_the_patched_model(tmp_path):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    model = patch(their_model("cpu"))
    torch.manual_seed(0)
    pixel_values, pixel_mask = padded_batch("cpu", sizes=((64, 64),) * 4)
    labels = random_labels([2, 1, 3, 2], 7, "cpu")
    samples = [{"pixel_values": v, "pixel_mask": m, "labels": t} for v, m, t in zip(pixel_values, pixel_mask, labels)]

    def collate(batch):
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in batch]),
            "pixel_mask": torch.stack([s["pixel_mask"] for s in batch]),
            "labels": [s["labels"] for s in batch],
        }

    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=samples, data_collator=collate)
    before = model.class_labels_classifier.weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.class_labels_classifier.weight)


def test_a_label_out_of_range_is_named():
    """A class label >= num_labels is an error naming the image, not an index error in the loss (or a device-side
    assert on CUDA)."""
    config = transformers.DetrConfig(num_labels=7, auxiliary_loss=False, use_pretrained_backbone=False)
    loss_function = make_loss_function(type("Model", (), {"config": config}))
    logits = torch.randn(2, 5, 8)
    boxes = random_cxcywh(2, 5, device="cpu", center_low=0.25, center_width=0.5, size_low=0.25, size_width=0.5)
    labels = random_labels([2, 1], 7, "cpu")
    labels[1]["class_labels"][0] = 7
    with pytest.raises(ValueError, match=r"labels\[1\]\['class_labels'\] holds \[7\]"):
        loss_function(logits, labels, "cpu", boxes, config)
