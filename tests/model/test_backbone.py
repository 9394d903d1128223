"""The backbone returns every feature level it computes (DETR's return_interm_layers); the detector reads the last."""

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_fast import DetrConfig, DetrForObjectDetection
from detr_fast.model.backbone import Backbone

from ..helpers import padded_batch, tiny_config_kwargs


def test_every_level_with_its_mask(device):
    kwargs = tiny_config_kwargs()
    kwargs.pop("use_timm_backbone")
    backbone = Backbone(DetrConfig(**kwargs)).to(device).eval()
    pixel_values, pixel_mask = padded_batch(device, sizes=((64, 96), (40, 64)))
    levels = backbone(pixel_values, pixel_mask)
    assert backbone.strides == (4, 8, 16, 32) and backbone.channels == (64, 128, 256, 512)
    assert [tuple(f.shape) for f, _ in levels] == [
        (2, c, 64 // s, 96 // s) for c, s in zip((64, 128, 256, 512), backbone.strides)
    ]
    for (_, mask), stride in zip(levels, backbone.strides):
        assert mask.dtype == torch.bool and mask.shape == (2, 64 // stride, 96 // stride)
        assert mask[0].all()  # the first image fills the batch
        # nearest-neighbour downsampling reads pixel (i * stride): real rows and columns are the first ceil(n / stride)
        rows, columns = -(-40 // stride), -(-64 // stride)
        assert mask[1, :rows, :columns].all() and not mask[1, rows:].any() and not mask[1, :, columns:].any()


def test_the_detector_reads_the_last_level(device, monkeypatch):
    kwargs = tiny_config_kwargs()
    kwargs.pop("use_timm_backbone")
    model = DetrForObjectDetection(DetrConfig(**kwargs)).to(device).eval()
    seen = []
    projection = model.model.input_projection.forward
    monkeypatch.setattr(model.model.input_projection, "forward", lambda x: seen.append(x.shape) or projection(x))
    with torch.no_grad():
        model(*padded_batch(device))
    assert seen == [torch.Size([3, 512, 2, 3])]  # stride 32 of the 64 x 96 batch


def test_folded_batch_norm_gives_the_same_features(device):
    """Every frozen BatchNorm of a ResNet-18 (the stem's, two per block, the downsampling ones) folds into its
    convolution; the features stay those of the unfolded backbone to float rounding, at every level."""
    kwargs = tiny_config_kwargs()
    kwargs.pop("use_timm_backbone")
    backbone = Backbone(DetrConfig(**kwargs)).to(device).eval()
    with torch.no_grad():  # norms that do something: random statistics and affine terms
        for module in backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                for buffer in (module.weight, module.bias, module.running_mean):
                    buffer.copy_(torch.randn_like(buffer) * 0.3 + (1.0 if buffer is module.weight else 0.0))
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    pixel_values, pixel_mask = padded_batch(device, sizes=((64, 96), (40, 64)))
    with torch.no_grad():
        expected = backbone(pixel_values, pixel_mask)
        assert norms == 20 and backbone.fold_batch_norm() == norms
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
        folded = backbone(pixel_values, pixel_mask)
    for (features, mask), (reference, reference_mask) in zip(folded, expected):
        assert torch.equal(mask, reference_mask)
        torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
