"""The convolutional backbone: a timm model with frozen BatchNorm, returning every feature level it computes with
its mask (DETR's return_interm_layers: the detector reads the last level, the mask head the earlier ones too)."""

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models._features import FeatureListNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import DEFAULT_OUT_INDICES, DetrConfig


class Backbone(nn.Module):
    """timm feature extractor (`config.backbone`) with BatchNorm frozen; for ResNets the stem and layer1 are frozen
    too, as in DETR. The timm module sits at `.model`, so state-dict keys read `model.backbone.model.*` as in
    transformers v5."""

    def __init__(self, config: DetrConfig):
        super().__init__()
        kwargs = dict(config.backbone_kwargs or {})
        out_indices = tuple(kwargs.pop("out_indices", DEFAULT_OUT_INDICES))
        kwargs["in_chans"] = config.num_channels  # transformers v4 configs also carry it in backbone_kwargs
        if config.dilation:
            kwargs["output_stride"] = kwargs.get("output_stride", 16)
        if not config.use_pretrained_backbone and "resnet" in config.backbone and "norm_layer" not in kwargs:
            # timm zero-initializes the last BatchNorm of each residual branch; frozen, that norm would keep the
            # branch dead forever in a backbone trained from random weights. (A trainable norm_layer learns its way
            # out of the zero init, so it keeps timm's default.)
            kwargs.setdefault("zero_init_last", False)
        try:
            model = timm.create_model(
                config.backbone,
                pretrained=config.use_pretrained_backbone,
                features_only=True,
                out_indices=out_indices,
                **kwargs,
            )
        except (OSError, RuntimeError) as error:  # the hub unreachable (offline), or the weights absent there
            if not config.use_pretrained_backbone:
                raise
            raise ValueError(
                f"cannot fetch timm's ImageNet weights of {config.backbone} ({type(error).__name__}: {error}); "
                "without network access start from random weights: use_pretrained_backbone=False "
                "(detr-fast train --no-pretrained-backbone), or put the weights in the Hugging Face cache"
            ) from error
        self.model = freeze_batch_norm_2d(model)
        self.channels = tuple(self.model.feature_info.channels())  # per level, e.g. (256, 512, 1024, 2048)
        self.strides = tuple(self.model.feature_info.reduction())  # per level, e.g. (4, 8, 16, 32)
        self.num_channels = self.channels[-1]
        if "resnet" in config.backbone:
            for name, parameter in self.model.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    parameter.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixel_values [B, 3, H, W], pixel_mask [B, H, W] (1 = real pixel) -> one (features [B, C_i, h_i, w_i],
        mask [B, h_i, w_i] bool, True = real) per level, in order of increasing stride."""
        levels = []
        for features in self.model(pixel_values):
            # Nearest-neighbour downsampling of the pixel mask to the feature grid, as DETR does.
            mask = F.interpolate(pixel_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]  # [B, h, w]
            levels.append((features, mask))
        return levels

    @torch.no_grad()
    def fold_batch_norm(self) -> int:
        """For inference: fold each frozen BatchNorm that directly follows a convolution into the convolution's
        weights and bias (in place; the norm becomes Identity), which saves a pass over the activations per
        convolution; the same outputs up to float rounding.
        Direct: the next module of a container that runs its modules in order (a Sequential, timm's feature
        extractor), or of timm's ResNet blocks (conv1 then bn1, ...). Returns how many were folded."""
        folded = 0
        in_order = (nn.Sequential, FeatureListNet, timm.models.resnet.Bottleneck, timm.models.resnet.BasicBlock)
        for parent in self.model.modules():
            if not isinstance(parent, in_order):
                continue
            children = list(parent.named_children())
            for (_, conv), (name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                    conv.weight, conv.bias = fuse_conv_bn_weights(
                        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
                    )
                    conv.weight.requires_grad_(False)
                    conv.bias.requires_grad_(False)
                    setattr(parent, name, nn.Identity())
                    folded += 1
        return folded
