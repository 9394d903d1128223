"""Bad inputs to the detector are clear errors naming the argument (before any computation)."""

import pytest
import torch

from detr_fast import DetrConfig, DetrForObjectDetection, pad_targets

from ..helpers import padded_batch, random_labels, tiny_config_kwargs


@pytest.fixture
def model(device):
    kwargs = tiny_config_kwargs()
    kwargs.pop("use_timm_backbone")
    return DetrForObjectDetection(DetrConfig(**kwargs)).to(device)


def test_pixel_values_must_be_a_non_empty_float_batch(model, device):
    pixel_values, pixel_mask = padded_batch(device)
    with pytest.raises(TypeError, match="pixel_values must be floating point, normalized images .* got torch.uint8"):
        model((pixel_values * 50).clamp(0, 255).to(torch.uint8), pixel_mask)
    with pytest.raises(ValueError, match=r"pixel_values holds no image \(shape \(0, 3, 64, 96\)\)"):
        model(pixel_values[:0], pixel_mask[:0])
    with pytest.raises(ValueError, match=r"pixel_values must be a \[B, C, H, W\] tensor, got \(3, 64, 96\)"):
        model(pixel_values[0])
    with pytest.raises(ValueError, match=r"pixel_mask has shape \(3, 64, 95\), expected \(3, 64, 96\)"):
        model(pixel_values, pixel_mask[..., :95])


def test_labels_must_cover_every_image(model, device):
    pixel_values, pixel_mask = padded_batch(device)  # 3 images
    labels = random_labels([2, 1], 7, device)
    with pytest.raises(ValueError, match=r"labels hold the targets of 2 image\(s\) but the batch has 3"):
        model(pixel_values, pixel_mask, labels=labels)
    with pytest.raises(ValueError, match=r"labels hold the targets of 2 image\(s\) but the batch has 3"):
        model(pixel_values, pixel_mask, labels=pad_targets(labels))
    labels.append({"class_labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])})
    with pytest.raises(ValueError, match=r"labels\[2\]\['class_labels'\] holds \[7\]; every label must be in \[0, 7\)"):
        model(pixel_values, pixel_mask, labels=labels)
