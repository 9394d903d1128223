"""DetrForSegmentation: against transformers' with the same weights (outputs, loss dict, gradients), its weights in
every layout, detection checkpoints into a segmentation model, freezing the detector, and its errors."""

import pytest
import torch

from detr_fast import DetrConfig, DetrForObjectDetection, DetrForSegmentation, pad_targets
from detr_fast.model.weights import detect_layout, from_detr_fast, original_checkpoint, read_checkpoint, to_detr_fast

from ..helpers import our_names_to_theirs, padded_batch, random_labels, relative_error, tiny_config_kwargs

TOLERANCE = 1e-5  # relative, float32
HEADS = dict(encoder_attention_heads=8, decoder_attention_heads=8)  # d_model + heads must be divisible by 8


def tiny_segmentation(device, **overrides) -> DetrForSegmentation:
    kwargs = tiny_config_kwargs(**{**HEADS, **overrides})
    kwargs.pop("use_timm_backbone")
    return DetrForSegmentation(DetrConfig(**kwargs)).to(device)


def labels_with_masks(counts, device, size=(64, 96), seed=0):
    """random_labels with a random binary mask [M_i, H, W] per target (the padded batch's size)."""
    generator = torch.Generator().manual_seed(seed)
    labels = random_labels(counts, 7, device)
    for target in labels:
        target["masks"] = (torch.rand(len(target["boxes"]), *size, generator=generator) > 0.6).to(device)
    return labels


def make_pair(device, auxiliary_loss):
    transformers = pytest.importorskip("transformers")
    config = transformers.DetrConfig(**tiny_config_kwargs(auxiliary_loss=auxiliary_loss, **HEADS))
    theirs = transformers.DetrForSegmentation(config).to(device)
    with torch.no_grad():  # distinct query embeddings keep the matching's optimum unique (test_parity_transformers)
        theirs.detr.model.query_position_embeddings.weight.normal_()
    return DetrForSegmentation.from_transformers(theirs), theirs


def their_labels(labels):
    """transformers' loss reads float masks."""
    return [{**target, "masks": target["masks"].float()} for target in labels]


@pytest.mark.transformers
@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["last", "aux"])
def test_outputs_and_loss_equal_transformers(device, auxiliary_loss):
    ours, theirs = make_pair(device, auxiliary_loss)
    ours.eval()
    theirs.eval()
    pixel_values, pixel_mask = padded_batch(device)
    labels = labels_with_masks([3, 0, 5], device)  # image 1 has no targets
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=their_labels(labels))
        got = ours(pixel_values, pixel_mask, labels=labels)
    assert got.pred_masks.shape == (3, 12, 16, 24)
    assert relative_error(got.pred_masks, expected.pred_masks) < TOLERANCE
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE
    assert list(got.loss_dict) == list(expected.loss_dict)
    assert {"loss_mask", "loss_dice"} <= set(got.loss_dict) and "loss_mask_0" not in got.loss_dict
    for key, value in expected.loss_dict.items():
        assert relative_error(got.loss_dict[key], value) < TOLERANCE, key
    assert relative_error(got.loss, expected.loss) < TOLERANCE
    assert got.loss_dict["loss_mask"] > 0 and got.loss_dict["loss_dice"] > 0


@pytest.mark.transformers
@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["last", "aux"])
def test_gradients_equal_transformers(device, auxiliary_loss):
    ours, theirs = make_pair(device, auxiliary_loss)
    ours.train()
    theirs.train()
    pixel_values, pixel_mask = padded_batch(device)
    labels = labels_with_masks([2, 4, 1], device)
    theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=their_labels(labels)).loss.backward()
    ours(pixel_values, pixel_mask, labels=labels).loss.backward()
    their_params = dict(theirs.named_parameters())
    their_names = our_names_to_theirs(ours, theirs)  # the same names in v5, renamed in v4
    # As in test_parity_transformers: gradients that are zero up to rounding are compared against a floor.
    floor = 1e-4 * max(p.grad.abs().max().item() for p in ours.parameters() if p.grad is not None)
    checked = set()
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        their_grad = their_params[their_names[name]].grad
        assert param.grad is not None and their_grad is not None, name
        assert relative_error(param.grad, their_grad, floor) < TOLERANCE, name
        checked.add(name.split(".")[0])
    assert checked == {"detr", "bbox_attention", "mask_head"}


@pytest.mark.transformers
def test_export_to_transformers(device):
    ours = tiny_segmentation(device).eval()
    exported = ours.to_transformers()
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        expected = exported(pixel_values=pixel_values, pixel_mask=pixel_mask)
        got = ours(pixel_values, pixel_mask)
    assert relative_error(got.pred_masks, expected.pred_masks) < TOLERANCE
    assert relative_error(got.logits, expected.logits) < TOLERANCE


def test_head_key_names_in_v4_and_original():
    """transformers v4 and facebookresearch/detr name the heads alike (DETRsegm's lay/gn/adapter/out_lay,
    MHAttentionMap's q_linear/k_linear), v5 and detr_fast by module."""
    names = [
        "mask_head.conv1.conv.weight",
        "mask_head.conv2.norm.bias",
        "mask_head.fpn_stages.0.fpn_adapter.weight",
        "mask_head.fpn_stages.1.refine.conv.bias",
        "mask_head.fpn_stages.2.refine.norm.weight",
        "mask_head.output_conv.weight",
        "bbox_attention.k_proj.weight",
        "detr.model.input_projection.weight",
    ]
    expected_heads = [
        "mask_head.lay1.weight",
        "mask_head.gn2.bias",
        "mask_head.adapter1.weight",
        "mask_head.lay4.bias",
        "mask_head.gn5.weight",
        "mask_head.out_lay.weight",
        "bbox_attention.k_linear.weight",
    ]
    v4 = list(from_detr_fast(dict.fromkeys(names), "transformers-v4"))
    assert v4 == [*expected_heads, "detr.model.input_projection.weight"]
    original = list(from_detr_fast(dict.fromkeys(names), "original"))
    assert original == [*expected_heads, "detr.input_proj.weight"]


@pytest.mark.parametrize("layout", ["transformers-v4", "original", "detr_fast"])
def test_layout_round_trip_is_exact(device, layout):
    state_dict = tiny_segmentation(device).state_dict()
    converted = from_detr_fast(state_dict, layout)
    assert detect_layout(converted) == layout
    assert all(k.startswith(("detr.", "mask_head.", "bbox_attention.")) for k in converted)
    back = to_detr_fast(converted)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_original_panoptic_checkpoint_loads_as_a_segmentation_model(device, tmp_path):
    """An original DETR panoptic checkpoint ({"model", "args"} with `detr.`-prefixed detector, `bbox_attention`
    and `mask_head`) loads into DetrForSegmentation, which evaluation and conversion pick from the weights."""
    from detr_fast.model import architecture_of

    model = tiny_segmentation(device, original_detr=True, decoder_ffn_dim=128).eval()  # the original: one width
    saved = original_checkpoint(model.state_dict(), model.config)
    assert saved["args"].masks and "detr.transformer.encoder.layers.0.self_attn.in_proj_weight" in saved["model"]
    path = tmp_path / "detr-panoptic.pth"
    torch.save({"model": saved["model"], "args": saved["args"]}, path)  # as the original writes it: no config
    state_dict, config = read_checkpoint(path)
    assert architecture_of(config, state_dict) == "DetrForSegmentation"
    loaded = DetrForSegmentation.from_pretrained(str(path), config=config).to(device)
    batch = padded_batch(device)
    with torch.no_grad():
        expected, got = model(*batch), loaded(*batch)
    assert torch.equal(got.pred_masks, expected.pred_masks) and torch.equal(got.logits, expected.logits)


def test_a_detection_checkpoint_starts_a_segmentation_model(device, tmp_path):
    """from_pretrained of a detector's checkpoint: its weights in `detr`, the heads at their initialization;
    save_pretrained then records the segmentation class, and the round trip is exact."""
    kwargs = tiny_config_kwargs(**HEADS)
    kwargs.pop("use_timm_backbone")
    detector = DetrForObjectDetection(DetrConfig(**kwargs)).to(device)
    detector.save_pretrained(tmp_path / "detector")
    model = DetrForSegmentation.from_pretrained(str(tmp_path / "detector")).to(device)
    for key, value in detector.state_dict().items():
        assert torch.equal(model.detr.state_dict()[key], value), key
    assert model.mask_head.output_conv.bias.abs().sum() == 0  # the head's own initialization (zero biases)
    model.save_pretrained(tmp_path / "segmentation")
    again = DetrForSegmentation.from_pretrained(str(tmp_path / "segmentation")).to(device)
    assert again.config.architectures == ["DetrForSegmentation"]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_freeze_detector_trains_the_mask_head_alone(device):
    model = tiny_segmentation(device).freeze_detector().train()
    pixel_values, pixel_mask = padded_batch(device)
    model(pixel_values, pixel_mask, labels=labels_with_masks([2, 1, 3], device)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.detr.parameters())
    heads = [*model.mask_head.parameters(), *model.bbox_attention.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)


def test_mask_loss_with_no_targets_is_zero(device):
    model = tiny_segmentation(device).eval()
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask, labels=labels_with_masks([0, 0, 0], device))
    assert out.loss_dict["loss_mask"] == 0 and out.loss_dict["loss_dice"] == 0
    assert torch.isfinite(out.loss)


def test_errors_name_what_is_wrong(device):
    with pytest.raises(ValueError, match=r"MaskHead: input_channels .* divisible by 8, got 68"):
        tiny_segmentation(device, encoder_attention_heads=4, decoder_attention_heads=4)
    with pytest.raises(ValueError, match=r"DetrForSegmentation: the mask head reads .* 1 level"):
        tiny_segmentation(device, backbone_kwargs={"out_indices": [4]})
    model = tiny_segmentation(device)
    pixel_values, pixel_mask = padded_batch(device)
    with pytest.raises(ValueError, match=r"DetrLoss: the mask term needs .* 'masks'"):
        model(pixel_values, pixel_mask, labels=random_labels([1, 1, 1], 7, device))


def test_pad_targets_pads_masks(device):
    labels = labels_with_masks([2, 0, 1], device)
    labels[2]["masks"] = labels[2]["masks"][:, :40, :50].float()  # a smaller mask, as 0/1 floats
    padded = pad_targets(labels, max_targets=3)
    masks = padded["masks"]
    assert masks.shape == (3, 3, 64, 96) and masks.dtype == torch.bool
    assert torch.equal(masks[0, :2], labels[0]["masks"]) and not masks[0, 2:].any() and not masks[1].any()
    assert torch.equal(masks[2, 0, :40, :50], labels[2]["masks"][0].bool()) and not masks[2, 0, 40:].any()
    labels[0]["masks"] = labels[0]["masks"].float() * 0.5
    with pytest.raises(ValueError, match=r"labels\[0\]\['masks'\] must be binary"):
        pad_targets(labels)
    del labels[0]["masks"]
    with pytest.raises(ValueError, match=r"labels\[0\] has no 'masks' but other images do"):
        pad_targets(labels)
    labels[0]["masks"] = torch.zeros(5, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"labels\[0\]\['masks'\] has shape \(5, 8, 8\), expected \[2, H, W\]"):
        pad_targets(labels)
