"""Tiny random DETR-family models of transformers, built offline (no hub download), with inputs and labels: what
the patch tests run. Each builder returns (model in train mode, inputs dict, labels)."""

from __future__ import annotations

import torch

IMAGES = 3  # images per batch: 4, 3 and 2 targets (one image without targets where the family allows it)


def make_labels(counts, num_labels, masks_size=None, seed=0):
    """transformers' labels: per image class_labels [n] and cxcywh boxes [n, 4] (and float masks [n, h, w])."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for count in counts:
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        label = {
            "class_labels": torch.randint(0, num_labels, (count,), generator=generator),
            "boxes": torch.cat([centres, sizes], -1),
        }
        if masks_size is not None:
            label["masks"] = (torch.rand(count, *masks_size, generator=generator) > 0.5).float()
        labels.append(label)
    return labels


def _resnet(out_features):
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                        layer_type="basic", out_features=out_features)  # fmt: skip


DETR_LIKE = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, num_labels=5,
                 auxiliary_loss=True)  # fmt: skip


def _pixels(size):
    return {"pixel_values": torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))}


def conditional_detr():
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(backbone_config=_resnet(["stage4"]), **DETR_LIKE))
    return model, _pixels(64), make_labels([4, 3, 0], 5)


def conditional_detr_segmentation():
    from transformers import ConditionalDetrConfig, ConditionalDetrForSegmentation

    heads = {"encoder_attention_heads": 8, "decoder_attention_heads": 8}  # the mask head: (d_model + heads) % 8 == 0
    backbone = _resnet(["stage1", "stage2", "stage3", "stage4"])
    config = ConditionalDetrConfig(backbone_config=backbone, **{**DETR_LIKE, **heads})
    return ConditionalDetrForSegmentation(config), _pixels(64), make_labels([4, 3, 2], 5, masks_size=(64, 64))


def dab_detr():
    from transformers import DabDetrConfig, DabDetrForObjectDetection

    kwargs = {k: v for k, v in DETR_LIKE.items() if k != "d_model"}
    model = DabDetrForObjectDetection(DabDetrConfig(backbone_config=_resnet(["stage4"]), hidden_size=32, **kwargs))
    return model, _pixels(64), make_labels([4, 3, 2], 5)


def deformable_detr(two_stage=False):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(backbone_config=_resnet(["stage2", "stage3", "stage4"]), num_feature_levels=3,
                                  two_stage_num_proposals=12, encoder_n_points=2, decoder_n_points=2,
                                  disable_custom_kernels=True, with_box_refine=two_stage, two_stage=two_stage,
                                  **DETR_LIKE)  # fmt: skip
    return DeformableDetrForObjectDetection(config), _pixels(64), make_labels([4, 3, 0], 5)


def _rt_detr_config(config_class, **overrides):
    from transformers import RTDetrResNetConfig

    hidden = [10, 20, 30, 40]
    backbone = RTDetrResNetConfig(embeddings_size=10, hidden_sizes=hidden, depths=[1, 1, 2, 1],
                                  out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])  # fmt: skip
    return config_class(backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=hidden[1:],
                        feat_strides=[8, 16, 32], encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2,
                        d_model=32, num_queries=30, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                        num_feature_levels=3, decoder_n_points=4, decoder_layers=2, decoder_attention_heads=2,
                        num_denoising=20, num_labels=10, disable_custom_kernels=True, **overrides)  # fmt: skip


def rt_detr(**overrides):
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    return RTDetrForObjectDetection(_rt_detr_config(RTDetrConfig, **overrides)), _pixels(64), make_labels([4, 3, 2], 10)


def rt_detr_v2():
    from transformers import RTDetrV2Config, RTDetrV2ForObjectDetection

    return RTDetrV2ForObjectDetection(_rt_detr_config(RTDetrV2Config)), _pixels(64), make_labels([4, 3, 2], 10)


def _d_fine_config(config_class, **overrides):
    from transformers import HGNetV2Config

    backbone = HGNetV2Config(stage_in_channels=[16, 64, 128, 256], stage_mid_channels=[16, 32, 64, 128],
                             stage_out_channels=[64, 128, 256, 512], stage_num_blocks=[1, 1, 2, 1],
                             stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
                             stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], embeddings_size=10,
                             hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1],
                             out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
                             stem_channels=[3, 16, 16], use_lab=True)  # fmt: skip
    return config_class(backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[128, 256, 512],
                        feat_strides=[8, 16, 32], encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2,
                        d_model=32, num_queries=30, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                        num_feature_levels=3, decoder_n_points=[3, 6, 3], decoder_layers=2, decoder_attention_heads=2,
                        num_denoising=20, num_labels=10, depth_mult=0.34, hidden_expansion=0.5,
                        disable_custom_kernels=True, **overrides)  # fmt: skip


def d_fine():
    from transformers import DFineConfig, DFineForObjectDetection

    return DFineForObjectDetection(_d_fine_config(DFineConfig)), _pixels(64), make_labels([4, 3, 2], 10)


def deimv2():
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    return Deimv2ForObjectDetection(_d_fine_config(Deimv2Config)), _pixels(64), make_labels([4, 3, 2], 10)


LW_DECODER = dict(d_model=32, projector_scale_factors=[0.5, 2.0], decoder_ffn_dim=32, decoder_layers=2,
                  decoder_self_attention_heads=2, decoder_cross_attention_heads=4, num_queries=10, group_detr=2,
                  num_labels=5)  # fmt: skip


def lw_detr():
    from transformers import LwDetrConfig, LwDetrForObjectDetection, LwDetrViTConfig

    backbone = LwDetrViTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, window_block_indices=[0, 2],
                               out_indices=[1, 3], num_windows=16, image_size=128)  # fmt: skip
    model = LwDetrForObjectDetection(LwDetrConfig(backbone_config=backbone, **LW_DECODER))
    return model, _pixels(128), make_labels([4, 3, 0], 5)


def _rf_backbone():
    from transformers import RfDetrDinov2Config

    return RfDetrDinov2Config(num_attention_heads=2, num_hidden_layers=4, out_features=["stage2", "stage3"],
                              hidden_size=32, patch_size=16, num_windows=2, image_size=128, mlp_ratio=4)  # fmt: skip


def rf_detr():
    from transformers import RfDetrConfig, RfDetrForObjectDetection

    model = RfDetrForObjectDetection(RfDetrConfig(backbone_config=_rf_backbone(), **LW_DECODER))
    return model, _pixels(128), make_labels([4, 3, 2], 5)


def rf_detr_segmentation():
    from transformers import RfDetrConfig, RfDetrForInstanceSegmentation

    model = RfDetrForInstanceSegmentation(RfDetrConfig(backbone_config=_rf_backbone(), **LW_DECODER))
    return model, _pixels(128), make_labels([4, 3, 2], 5, masks_size=(32, 32))


def _grounding_inputs(size):
    # "[CLS] a . b . . [SEP]": two phrases (101, 102, 1012 and 0 delimit them), so the class ids are 0 and 1
    input_ids = torch.tensor([101, 3869, 1012, 11420, 1012, 1012, 102]).unsqueeze(0).expand(IMAGES, -1)
    return {**_pixels(size), "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _grounding_config(config_class):
    from transformers import SwinConfig

    swin = SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=98,
                      out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])  # fmt: skip
    text = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 8, "max_position_embeddings": 8}  # fmt: skip
    return config_class(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=4, decoder_ffn_dim=4, num_queries=6,
                        num_feature_levels=4, encoder_n_points=2, decoder_n_points=6, use_timm_backbone=False,
                        backbone_config=swin, max_text_len=7, text_config=text, auxiliary_loss=True)  # fmt: skip


def grounding_dino():
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection(_grounding_config(GroundingDinoConfig))
    return model, _grounding_inputs(98), make_labels([4, 3, 2], 2)


def mm_grounding_dino():
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    model = MMGroundingDinoForObjectDetection(_grounding_config(MMGroundingDinoConfig))
    return model, _grounding_inputs(98), make_labels([4, 3, 2], 2)


def detr_segmentation():
    from transformers import DetrConfig, DetrForSegmentation

    config = DetrConfig(backbone_config=_resnet(["stage1", "stage2", "stage3", "stage4"]), use_timm_backbone=False,
                        **{**DETR_LIKE, "encoder_attention_heads": 8, "decoder_attention_heads": 8})  # fmt: skip
    return DetrForSegmentation(config), _pixels(64), make_labels([4, 3, 2], 5, masks_size=(64, 64))


FAMILIES = {
    "DetrForSegmentation": detr_segmentation,
    "ConditionalDetrForObjectDetection": conditional_detr,
    "ConditionalDetrForSegmentation": conditional_detr_segmentation,
    "DabDetrForObjectDetection": dab_detr,
    "DeformableDetrForObjectDetection": deformable_detr,
    "DeformableDetrForObjectDetection two-stage": lambda: deformable_detr(two_stage=True),
    "RTDetrForObjectDetection": rt_detr,
    "RTDetrForObjectDetection softmax": lambda: rt_detr(use_focal_loss=False),
    "RTDetrForObjectDetection no auxiliary loss": lambda: rt_detr(auxiliary_loss=False),
    "RTDetrV2ForObjectDetection": rt_detr_v2,
    "DFineForObjectDetection": d_fine,
    "Deimv2ForObjectDetection": deimv2,
    "LwDetrForObjectDetection": lw_detr,
    "RfDetrForObjectDetection": rf_detr,
    "RfDetrForInstanceSegmentation": rf_detr_segmentation,
    "GroundingDinoForObjectDetection": grounding_dino,
    "MMGroundingDinoForObjectDetection": mm_grounding_dino,
}
