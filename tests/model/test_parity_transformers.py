"""Our DETR against transformers' DetrForObjectDetection, same random weights: outputs, loss dict, gradients."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers

from detr_fast import DetrForObjectDetection  # noqa: E402

from ..helpers import (  # noqa: E402
    assert_outputs_equal,
    our_names_to_theirs,
    padded_batch,
    random_labels,
    relative_error,
    tiny_config_kwargs,
)

TOLERANCE = 1e-5  # relative, float32

CASES = [
    pytest.param("resnet18", False, id="resnet18"),
    pytest.param("resnet18", True, id="resnet18-aux"),
    pytest.param("resnet50", False, id="resnet50"),
    pytest.param("resnet50", True, id="resnet50-aux"),
]


def make_pair(backbone, auxiliary_loss, device, **overrides):
    config = transformers.DetrConfig(**tiny_config_kwargs(backbone, auxiliary_loss, **overrides))
    theirs = transformers.DetrForObjectDetection(config).to(device)
    with torch.no_grad():
        # transformers initializes the query embeddings with std 0.02, which makes every query predict nearly
        # the same box: matching costs then tie to float rounding and the two models may pick different (equally
        # good) assignments. DETR's own N(0, 1) init keeps the optimum unique, so gradients are comparable.
        theirs.model.query_position_embeddings.weight.normal_()
    ours = DetrForObjectDetection.from_transformers(theirs)
    return ours, theirs


@pytest.mark.parametrize("backbone,auxiliary_loss", CASES)
def test_outputs_and_loss_equal_transformers(device, backbone, auxiliary_loss):
    ours, theirs = make_pair(backbone, auxiliary_loss, device)
    ours.eval()
    theirs.eval()
    pixel_values, pixel_mask = padded_batch(device)
    labels = random_labels([3, 0, 5], 7, device)  # image 1 has no targets
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        got = ours(pixel_values, pixel_mask, labels=labels)
    assert_outputs_equal(got, expected, TOLERANCE)
    assert len(got.auxiliary_outputs or []) == (2 if auxiliary_loss else 0)


@pytest.mark.parametrize("backbone,auxiliary_loss", CASES)
def test_gradients_equal_transformers(device, backbone, auxiliary_loss):
    ours, theirs = make_pair(backbone, auxiliary_loss, device)
    ours.train()
    theirs.train()
    pixel_values, pixel_mask = padded_batch(device)
    labels = random_labels([2, 4, 0], 7, device)
    theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss.backward()
    ours(pixel_values, pixel_mask, labels=labels).loss.backward()
    their_params = dict(theirs.named_parameters())
    # Gradients that are zero up to rounding (softmax cancels the key bias exactly; some key weights get ~1e-12)
    # are compared against a floor of 1e-4 of the largest gradient instead of their own float noise.
    floor = 1e-4 * max(p.grad.abs().max().item() for p in ours.parameters() if p.grad is not None)
    checked = 0
    for name, param in ours.named_parameters():
        if not param.requires_grad:  # stem and layer1 are frozen in DETR
            continue
        their_grad = their_params[our_names_to_theirs(ours, theirs)[name]].grad
        assert param.grad is not None and their_grad is not None, name
        assert relative_error(param.grad, their_grad, floor) < TOLERANCE, name
        checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "overrides", [{"dilation": True}, {"position_embedding_type": "learned"}], ids=["dc5", "learned"]
)
def test_variants_equal_transformers(device, overrides):
    """DC5 (dilated last stage) and learned position embeddings, with loss."""
    ours, theirs = make_pair("resnet18", True, device, **overrides)
    ours.eval()
    theirs.eval()
    assert ours.config.dilation == overrides.get("dilation", False)
    pixel_values, pixel_mask = padded_batch(device)
    labels = random_labels([1, 2, 3], 7, device)
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        got = ours(pixel_values, pixel_mask, labels=labels)
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE
    assert relative_error(got.loss, expected.loss) < TOLERANCE


@pytest.mark.parametrize("position_embedding_type", ["sine", "learned"])
def test_export_back_to_transformers(device, position_embedding_type):
    ours, _ = make_pair("resnet18", True, device, position_embedding_type=position_embedding_type)
    exported = ours.to_transformers()
    ours.eval()
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        expected = exported(pixel_values=pixel_values, pixel_mask=pixel_mask)
        got = ours(pixel_values, pixel_mask)
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE


def test_post_process_equals_transformers(device):
    pytest.importorskip("transformers.models.detr.image_processing_detr")
    ours, _ = make_pair("resnet18", False, device)
    ours.eval()
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        outputs = ours(pixel_values, pixel_mask)
    sizes = torch.tensor([[480, 640], [300, 500], [640, 400]])
    processor = transformers.DetrImageProcessor()
    expected = processor.post_process_object_detection(outputs, threshold=0.1, target_sizes=sizes)
    got = ours.post_process_object_detection(outputs, threshold=0.1, target_sizes=sizes)
    for a, b in zip(got, expected):
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(a[key], b[key])
