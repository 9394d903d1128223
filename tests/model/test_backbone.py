"""The backbone returns every feature level it computes (DETR's return_interm_layers); the detector reads the last."""

import torch

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
