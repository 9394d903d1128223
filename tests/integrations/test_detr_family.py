"""`patch(model)` on transformers' DETR descendants: the batched, sync-free matcher gives the matching
transformers' scipy matchers give, so the loss dict and every gradient equal the unpatched model's; scipy is not
called once patched; unpatch restores. The matchers are also compared one by one on hard cases (more targets
than queries, images without targets, Group-DETR groups that do not divide the queries, NaN predictions,
RF-DETR's random mask points, Grounding DINO's phrase maps). transformers 5.x only (not marked `transformers`: the
4.x run of `make test-transformers4` lacks most of these families and their loss modules)."""

import importlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from detr_fast.integrations import detr_family  # noqa: E402
from detr_fast.integrations.detr_family import (  # noqa: E402
    FOCAL_CRITERION_MODELS,
    IOU_AWARE_CRITERION_MODELS,
    REPLACEMENTS,
    SEGMENTATION_CRITERION_MODELS,
    VARIFOCAL_CRITERION_MODELS,
    batched_matchers,
)
from detr_fast.integrations.transformers import PATCHED, patch, unpatch  # noqa: E402

from .family_models import FAMILIES, make_labels  # noqa: E402


def _loss_modules():
    modules = []
    for module_name in sorted({name for name, _, _ in REPLACEMENTS}):
        try:
            modules.append(importlib.import_module(module_name))
        except ImportError:
            continue
    return modules


def _step(model, inputs, labels, seed=0):
    """(loss dict as floats, gradients) of one training forward + backward (RNG seeded: denoising groups and
    random mask points are drawn)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    output = model(**inputs, labels=[dict(label) for label in labels])
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in output.loss_dict.items()}, grads


def _family_model(name):
    model, inputs, labels = FAMILIES[name]()
    return model.train(), inputs, labels


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_patched_loss_and_gradients_equal_transformers(name, monkeypatch):
    model, inputs, labels = _family_model(name)
    expected_losses, expected_grads = _step(model, inputs, labels)
    patch(model)
    assert getattr(model, PATCHED)
    replaced = name.split()[0] in (
        *FOCAL_CRITERION_MODELS,
        *VARIFOCAL_CRITERION_MODELS,
        *SEGMENTATION_CRITERION_MODELS,
        *IOU_AWARE_CRITERION_MODELS,
    )
    assert hasattr(model.loss_function, "__wrapped__") != replaced  # transformers' criterion, or detr_fast's
    with monkeypatch.context() as scipy_gone:
        for module in _loss_modules():
            if hasattr(module, "linear_sum_assignment"):
                scipy_gone.setattr(module, "linear_sum_assignment", _forbidden)
        losses, grads = _step(model, inputs, labels)
    assert losses.keys() == expected_losses.keys()
    for key, value in expected_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert grads.keys() == expected_grads.keys() and grads
    # a floor relative to the model's largest gradient: a key bias's gradient is zero up to rounding (softmax is
    # invariant to it), and a replaced criterion sums in another order
    floor = 1e-5 * max(grad.abs().max().item() for grad in expected_grads.values())
    for parameter, grad in expected_grads.items():
        torch.testing.assert_close(grads[parameter], grad, rtol=1e-4, atol=floor, msg=parameter)
    unpatch(model)
    assert not getattr(model, PATCHED, False)
    again, _ = _step(model, inputs, labels)
    assert again == expected_losses  # transformers' own loss again, bit for bit


def _forbidden(*args, **kwargs):
    raise AssertionError("scipy's linear_sum_assignment was called by a patched loss")


def test_rt_detr_in_eval_mode_without_denoising_equals_transformers():
    model, inputs, labels = FAMILIES["RTDetrForObjectDetection"]()
    model.eval()  # no denoising queries: only the matched sets are scored
    with torch.no_grad():
        expected = model(**inputs, labels=[dict(label) for label in labels]).loss_dict
        patch(model)
        got = model(**inputs, labels=[dict(label) for label in labels]).loss_dict
    assert got.keys() == expected.keys() and not any("_dn_" in key for key in got)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("name", ["DFineForObjectDetection", "Deimv2ForObjectDetection"])
def test_d_fine_layers_are_matched_in_one_call(name, monkeypatch):
    """D-FINE's and DEIMv2's criteria ask the matcher layer by layer; patched, the last layer, every decoder layer
    and the encoder proposals are matched by one solver call, and the criterion's forward is restored after."""
    model, inputs, labels = _family_model(name)
    patch(model)
    calls = []
    solver = detr_family.assign
    monkeypatch.setattr(detr_family, "assign", lambda cost, *args: calls.append(cost.shape) or solver(cost, *args))
    criterion = importlib.import_module("transformers.loss.loss_rt_detr").RTDetrLoss.forward
    _step(model, inputs, labels)
    layers = model.config.decoder_layers + 1  # the decoder layers and the encoder proposals
    assert len(calls) == 1 and calls[0][0] == layers, calls  # [layers, B, N, M]
    assert importlib.import_module("transformers.loss.loss_rt_detr").RTDetrLoss.forward is criterion


def test_the_swap_is_scoped_to_the_patched_loss():
    module = importlib.import_module("transformers.loss.loss_rt_detr")
    original = module.RTDetrHungarianMatcher
    with batched_matchers():
        with batched_matchers():  # re-entrant
            assert module.RTDetrHungarianMatcher is not original
            assert issubclass(module.RTDetrHungarianMatcher, original)
        assert module.RTDetrHungarianMatcher is not original
    assert module.RTDetrHungarianMatcher is original
    with pytest.raises(RuntimeError), batched_matchers():
        raise RuntimeError("a loss that fails")
    assert module.RTDetrHungarianMatcher is original  # restored on the error too


def test_an_unsupported_model_is_named():
    with pytest.raises(TypeError, match="none of the DETR-family models"):
        patch(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ matcher by matcher


def _outputs(batch, queries, classes, seed=0, nan_box=None):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, queries, classes, generator=generator)  # confident: the class term decides
    centres = torch.rand(batch, queries, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.4 + 0.05
    boxes = torch.cat([centres, sizes], -1)
    if nan_box is not None:
        boxes[nan_box] = float("nan")
    return {"logits": logits, "pred_boxes": boxes}


def _same_matching(ours, theirs):
    assert len(ours) == len(theirs)
    for (rows, columns), (their_rows, their_columns) in zip(ours, theirs):
        assert rows.dtype == columns.dtype == torch.int64
        assert rows.tolist() == their_rows.tolist() and columns.tolist() == their_columns.tolist()


def _compare(module_name, class_name, construct, outputs, targets, *args, seed=None):
    module = importlib.import_module(module_name)
    original = getattr(module, class_name)
    if seed is not None:
        torch.manual_seed(seed)
    theirs = original(*construct)(outputs, targets, *args)
    with batched_matchers():
        batched = getattr(module, class_name)(*construct)
    if seed is not None:
        torch.manual_seed(seed)
    ours = batched(outputs, targets, *args)
    _same_matching(ours, theirs)
    return ours


# images with more targets than queries, none, and some
COUNTS = [9, 0, 3, 5]


def test_softmax_and_focal_matchers_match_scipy():
    targets = make_labels(COUNTS, 6, seed=3)
    outputs = _outputs(len(COUNTS), 7, 7)  # 6 classes + no-object
    ours = _compare("transformers.loss.loss_for_object_detection", "HungarianMatcher", (1, 5, 2), outputs, targets)
    assert [len(rows) for rows, _ in ours] == [7, 0, 3, 5]
    focal = _outputs(len(COUNTS), 20, 6, seed=1)
    _compare("transformers.loss.loss_deformable_detr", "DeformableDetrHungarianMatcher", (5, 1, 1), focal, targets)


@pytest.mark.parametrize("focal", [True, False])
def test_rt_detr_matcher_reads_its_config(focal):
    config = SimpleNamespace(matcher_class_cost=5.0, matcher_bbox_cost=1.0, matcher_giou_cost=1.0,
                             use_focal_loss=focal, matcher_alpha=0.4, matcher_gamma=1.5)  # fmt: skip
    targets = make_labels(COUNTS, 6, seed=4)
    outputs = _outputs(len(COUNTS), 20, 6, seed=2)
    for module in ("transformers.loss.loss_rt_detr", "transformers.loss.loss_d_fine"):
        _compare(module, "RTDetrHungarianMatcher", (config,), outputs, targets)


def test_group_detr_matcher_matches_each_group():
    targets = make_labels(COUNTS, 5, seed=5)
    outputs = _outputs(len(COUNTS), 26, 5, seed=3)  # 3 groups of 8 queries, 2 queries left over
    ours = _compare("transformers.loss.loss_lw_detr", "LwDetrHungarianMatcher", (5, 1, 1), outputs, targets, 3)
    assert [len(rows) for rows, _ in ours] == [24, 0, 9, 15]
    assert max(int(rows.max()) for rows, _ in ours if len(rows)) < 24


def test_rf_detr_mask_matcher_draws_the_same_points():
    targets = make_labels(COUNTS, 5, masks_size=(16, 16), seed=6)
    outputs = _outputs(len(COUNTS), 16, 5, seed=4)
    outputs["pred_masks"] = torch.randn(len(COUNTS), 16, 16, 16, generator=torch.Generator().manual_seed(5))
    construct = (2, 1, 1, 16, 5.0, 5.0)
    _compare("transformers.loss.loss_rf_detr", "RfDetrHungarianMatcher", construct, outputs, targets, 2, seed=11)


def test_grounding_dino_matcher_averages_over_phrase_tokens():
    counts = [4, 0, 3]
    targets = make_labels(counts, 3, seed=7)
    outputs = _outputs(len(counts), 20, 8, seed=5)  # 8 text tokens
    phrase_tokens = torch.zeros(3, 8)
    phrase_tokens[0, 1:3] = phrase_tokens[1, 4] = phrase_tokens[2, 5:8] = 1  # 3 phrases of 2, 1 and 3 tokens
    outputs["label_maps"] = (phrase_tokens,) * len(counts)
    _compare("transformers.loss.loss_grounding_dino", "GroundingDinoHungarianMatcher", (5, 1, 1), outputs, targets)


def test_a_nan_box_is_matched_last_where_transformers_raises():
    module = importlib.import_module("transformers.loss.loss_deformable_detr")
    targets = make_labels(COUNTS, 6, seed=3)
    outputs = _outputs(len(COUNTS), 7, 6, nan_box=(2, 4))  # image 2 (3 targets): query 4's box is NaN
    with pytest.raises(ValueError):  # transformers' GIoU checks the boxes and raises on NaN
        module.DeformableDetrHungarianMatcher(2, 5, 2)(outputs, targets)
    with batched_matchers():
        ours = module.DeformableDetrHungarianMatcher(2, 5, 2)(outputs, targets)
    assert [len(rows) for rows, _ in ours] == [7, 0, 3, 5]
    assert 4 not in ours[2][0].tolist()  # its cost is the largest float: never chosen while another query is free
    outputs["pred_boxes"][2, 4] = 0.5  # the same matching otherwise
    healthy = module.DeformableDetrHungarianMatcher(2, 5, 2)(outputs, targets)
    assert [r.tolist() for r, _ in ours[:2]] == [r.tolist() for r, _ in healthy[:2]]


def test_iou_aware_loss_equals_transformers_with_a_query_in_no_group():
    """IouAwareDetrLoss against transformers' LwDetrImageLoss on raw outputs: 21 queries in 2 groups of 10 (the last
    query in none, never matched), an image without targets, three sets (last layer, one auxiliary, encoder)."""
    from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss

    from detr_fast import pad_targets
    from detr_fast.loss import IouAwareDetrLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 21, 5, generator=generator).requires_grad_()  # [S, B, N, C]
    boxes = (torch.rand(3, 3, 21, 4, generator=generator) * 0.4 + 0.3).requires_grad_()
    labels = make_labels([4, 2, 0], 5)
    ours = IouAwareDetrLoss(5, 2.0, 5.0, 2.0, 0.25, 1.5, 5.0, 2.0, groups=2)
    loss, loss_dict, _ = ours(logits, boxes, pad_targets(labels, num_classes=5))
    theirs = LwDetrImageLoss(LwDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0), 5, 0.25,
                             ["labels", "boxes", "cardinality"], group_detr=2)  # fmt: skip
    outputs = {"logits": logits[0], "pred_boxes": boxes[0],
               "auxiliary_outputs": [{"logits": logits[1], "pred_boxes": boxes[1]}],
               "enc_outputs": {"logits": logits[2], "pred_boxes": boxes[2]}}  # fmt: skip
    expected = theirs(outputs, labels)
    assert loss_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert float(loss_dict[key].detach()) == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-7), key
    weights = {"loss_ce": 1.5, "loss_bbox": 5.0, "loss_giou": 2.0}  # every set's terms, as transformers' sum
    expected_loss = sum(value * weight for key, value in expected.items() for name, weight in weights.items()
                        if key == name or key.startswith(name + "_"))  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-5)
    for mine, reference in zip(
        torch.autograd.grad(loss, (logits, boxes)), torch.autograd.grad(expected_loss, (logits, boxes))
    ):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    matched, _ = ours.match(logits, boxes, pad_targets(labels, num_classes=5), torch.tensor(1.0))
    assert (matched.assignment[..., 20] == -1).all() and (matched.assignment[:, :2] >= 0).sum() == 3 * 2 * (4 + 2)
