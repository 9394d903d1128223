"""The documented output surface: DetrModelOutput and every field of DetrObjectDetectionOutput equal to
transformers' (hidden states and attention weights included), outputs that index, unpack and export like
transformers', the pixel mask's default, a list of images as input, and gradient checkpointing."""

import pytest
import torch

from detr_fast import DetrConfig, DetrForObjectDetection
from detr_fast.model import DetrModel, DetrModelOutput, DetrObjectDetectionOutput

from ..helpers import padded_batch, random_labels, relative_error, tiny_config_kwargs

TOLERANCE = 1e-5  # relative, float32


def our_model(device, **overrides) -> DetrForObjectDetection:
    kwargs = tiny_config_kwargs(**overrides)
    kwargs.pop("use_timm_backbone")
    return DetrForObjectDetection(DetrConfig(**kwargs)).to(device).eval()


def assert_sequences_equal(name, got, expected):
    assert got is not None and len(got) == len(expected) > 0, name
    for i, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        assert ours.shape == theirs.shape, f"{name}[{i}]: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        assert relative_error(ours, theirs) < TOLERANCE, f"{name}[{i}]"


@pytest.mark.transformers
@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["last-layer", "aux"])
def test_hidden_states_and_attentions_equal_transformers(device, auxiliary_loss):
    transformers = pytest.importorskip("transformers")
    config = transformers.DetrConfig(**tiny_config_kwargs(auxiliary_loss=auxiliary_loss), attn_implementation="eager")
    theirs = transformers.DetrForObjectDetection(config).to(device).eval()
    ours = DetrForObjectDetection.from_transformers(theirs)
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        expected = theirs(pixel_values, pixel_mask, output_attentions=True, output_hidden_states=True)
        got = ours(pixel_values, pixel_mask, output_attentions=True, output_hidden_states=True)
    assert isinstance(got, DetrObjectDetectionOutput)
    for name in ("decoder_hidden_states", "encoder_hidden_states", "decoder_attentions", "cross_attentions",
                 "encoder_attentions"):  # fmt: skip
        assert_sequences_equal(name, getattr(got, name), getattr(expected, name))
    for name in ("logits", "pred_boxes", "last_hidden_state", "encoder_last_hidden_state"):
        assert relative_error(getattr(got, name), getattr(expected, name)) < TOLERANCE, name
    # The base model alone: DetrModelOutput with the same fields as transformers' DetrModel.
    with torch.no_grad():
        expected_base = theirs.model(pixel_values, pixel_mask, output_hidden_states=True)
        got_base = ours.model(pixel_values, pixel_mask, output_hidden_states=True)
    assert isinstance(got_base, DetrModelOutput) and list(got_base.keys()) == list(expected_base.keys())
    for name in expected_base.keys():
        theirs_value, ours_value = expected_base[name], got_base[name]
        if isinstance(theirs_value, tuple):
            assert_sequences_equal(name, ours_value, theirs_value)
        else:
            assert relative_error(ours_value, theirs_value) < TOLERANCE, name


@pytest.mark.transformers
def test_the_outputs_have_transformers_fields():
    transformers = pytest.importorskip("transformers")
    import dataclasses

    from transformers.models.detr import modeling_detr

    ours = {f.name for f in dataclasses.fields(DetrObjectDetectionOutput)}
    theirs = {f.name for f in dataclasses.fields(modeling_detr.DetrObjectDetectionOutput)}
    assert theirs <= ours and ours - theirs == {"match_status"}
    ours_base = {f.name for f in dataclasses.fields(DetrModelOutput)}
    theirs_base = {f.name for f in dataclasses.fields(modeling_detr.DetrModelOutput)}
    # A decoder without autoregression has no key/value cache (v5 "cache", v4 "past_key_values").
    assert ours_base <= theirs_base and theirs_base - ours_base <= {"cache", "past_key_values"}
    assert transformers.__version__  # the comparison ran against an installed transformers


def test_outputs_index_and_unpack_like_transformers(device):
    model = our_model(device)
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask, labels=random_labels([1, 2, 0], 7, device))
    assert out[0] is out.loss and out["logits"] is out.logits and out[2] is out.logits
    assert list(out.keys())[:4] == ["loss", "loss_dict", "logits", "pred_boxes"] and "decoder_attentions" not in out
    logits, pred_boxes = out.to_tuple()[2:4]
    assert logits is out.logits and pred_boxes is out.pred_boxes
    loss, *_ = out.values()
    assert loss is out.loss and len(out) == len(out.keys())
    with pytest.raises(KeyError):
        out["decoder_attentions"]


def test_pixel_mask_defaults_to_all_real_and_a_list_of_images_is_padded(device):
    model = our_model(device)
    sizes = ((64, 96), (48, 80))
    pixel_values, pixel_mask = padded_batch(device, sizes=sizes)
    images = [pixel_values[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        padded = model(pixel_values, pixel_mask)
        listed = model(images)
        full = model(pixel_values[:1])
        full_with_mask = model(pixel_values[:1], torch.ones_like(pixel_mask[:1]))
        base = model.model(pixel_values[:1])  # DetrModel needs no pixel mask either
    assert torch.equal(listed.logits, padded.logits) and torch.equal(listed.pred_boxes, padded.pred_boxes)
    assert torch.equal(full.logits, full_with_mask.logits)
    assert base.last_hidden_state.shape == (1, 12, 64)


def test_torch_export_sees_through_the_outputs(device):
    model = our_model(device)
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        exported = torch.export.export(model, (pixel_values, pixel_mask))
        expected = model(pixel_values, pixel_mask)
        got = exported.module()(pixel_values, pixel_mask)
    assert isinstance(got, DetrObjectDetectionOutput)
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE


def test_gradient_checkpointing_gives_the_same_gradients(device):
    model = our_model(device, dropout=0.1, auxiliary_loss=True).train()
    pixel_values, pixel_mask = padded_batch(device)
    labels = random_labels([2, 1, 3], 7, device)

    def gradients():
        torch.manual_seed(0)  # the same dropout masks in both runs
        model.zero_grad()
        model(pixel_values, pixel_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.decoder.gradient_checkpointing
    checkpointed = gradients()
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert relative_error(checkpointed[name], grad) < TOLERANCE, name


def test_output_attentions_says_it_takes_the_reference(device):
    assert "reference" in DetrModel.forward.__doc__
    model = our_model(device)
    with torch.no_grad():
        out = model(*padded_batch(device), output_attentions=True)
    assert len(out.encoder_attentions) == 2 and out.encoder_attentions[0].shape[:2] == (3, 4)
    weights = out.cross_attentions[0]  # [B, H, N, S]: rows sum to 1 over the real keys, 0 on padding
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
