"""Shared pieces of the model tests: tiny configs, batches with differently padded images, error metrics."""

import torch


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-6) -> float:
    """max |ours - theirs| / max(max |theirs|, floor). The floor keeps tensors that are zero up to rounding (the
    key-projection bias gradient, which softmax cancels exactly) from turning float noise into a large ratio."""
    scale = max(theirs.abs().max().item(), floor)
    return (ours.double() - theirs.double()).abs().max().item() / scale


def tiny_config_kwargs(backbone: str = "resnet18", auxiliary_loss: bool = False, **overrides) -> dict:
    """Fields that transformers' DetrConfig and ours share, for a model that runs in a second on the CPU."""
    kwargs = dict(
        backbone=backbone,
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        num_labels=7,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,
        num_queries=12,
        auxiliary_loss=auxiliary_loss,
        dropout=0.0,
    )
    kwargs.update(overrides)
    return kwargs


def padded_batch(device, sizes=((64, 96), (48, 80), (64, 50)), channels=3):
    """Images of different sizes padded to the largest, as a DETR collate does: (pixel_values, pixel_mask)."""
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), channels, height, width, device=device)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long, device=device)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(channels, h, w, device=device)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def random_labels(counts, num_labels, device):
    """transformers-style labels with `counts[i]` valid boxes in image i (0 allowed)."""
    labels = []
    for m in counts:
        cxcy = torch.rand(m, 2, device=device) * 0.6 + 0.2
        wh = torch.rand(m, 2, device=device) * 0.3 + 0.05
        labels.append(
            {"class_labels": torch.randint(0, num_labels, (m,), device=device), "boxes": torch.cat([cxcy, wh], -1)}
        )
    return labels


def assert_outputs_equal(got, expected, tolerance: float) -> None:
    """Two detection outputs (ours or transformers') agree: logits, boxes, the loss dict key by key (same keys in
    the same order), the loss, and every auxiliary layer's logits and boxes, to `tolerance` relative."""
    assert relative_error(got.logits, expected.logits) < tolerance
    assert relative_error(got.pred_boxes, expected.pred_boxes) < tolerance
    if expected.loss_dict is not None:
        assert list(got.loss_dict) == list(expected.loss_dict)
        for key, value in expected.loss_dict.items():
            assert relative_error(got.loss_dict[key], value) < tolerance, key
        assert relative_error(got.loss, expected.loss) < tolerance
    if expected.auxiliary_outputs is not None:
        assert len(got.auxiliary_outputs) == len(expected.auxiliary_outputs)
        for ours, theirs in zip(got.auxiliary_outputs, expected.auxiliary_outputs):
            assert relative_error(ours["logits"], theirs["logits"]) < tolerance
            assert relative_error(ours["pred_boxes"], theirs["pred_boxes"]) < tolerance
