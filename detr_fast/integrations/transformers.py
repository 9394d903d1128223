"""Speed up a transformers DETR (or DETR-family) model in place: `patch(model)` swaps its attention for detr_fast's
(ops.qkv_projection + ops.attention: the positional addition inside the projection, flash attention with the key
padding mask) and its matcher/criterion for detr_fast.loss (padded targets, all decoder layers matched in one
batched call). Weights, outputs and the loss dict stay the same (within floating-point tolerance), so a
transformers Trainer script speeds up with one line:

    from detr_fast.integrations.transformers import patch
    model = patch(DetrForObjectDetection.from_pretrained(...))

The DETR descendants transformers ships (Conditional, DAB and Deformable DETR, RT-DETR v1/v2, D-FINE, DEIMv2,
LW-DETR, RF-DETR detection and instance segmentation, Grounding DINO) patch the same way: their Hungarian matcher
becomes detr_fast's batched, sync-free one (detr_family.py), and where every term of their criterion maps onto
detr_fast's (detr_family's *_CRITERION_MODELS) the whole criterion is replaced too.

`unpatch(model)` restores the original methods. Supported: transformers v5 (DetrSelfAttention /
DetrCrossAttention) and v4 (DetrAttention; the criterion needs v4.46 or later, where the model calls
`self.loss_function`). The fused attention does not materialize attention weights: a call that asks for them
(output_attentions, as an argument or in the config) takes the reference attention, which does.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from .. import ops, reference
from ..data.targets import is_padded, pad_targets
from ..loss import DetrLoss, FocalDetrLoss, IouAwareDetrLoss, VarifocalDetrLoss
from ..model.transformer import project_cross_attention, project_self_attention
from .detr_family import (
    FAMILY_MODELS,
    FOCAL_CRITERION_MODELS,
    IOU_AWARE_CRITERION_MODELS,
    SEGMENTATION_CRITERION_MODELS,
    VARIFOCAL_CRITERION_MODELS,
    batched_loss_function,
)

PATCHED = "_detr_fast_patched"


# ------------------------------------------------------------------------------------------------- masks and heads


def _key_padding(mask: torch.Tensor | None, bool_means_keep: bool) -> torch.Tensor | None:
    """transformers' attention mask -> key_padding_mask [B, S] bool (True = padding).

    DETR's masks only ever mask keys (padded pixels, or masked queries in decoder self-attention), so every query
    row of a [B, 1, L, S] mask is the same and the first one is read. Float masks are additive (negative at
    padding); bool masks are True = keep in transformers v5 (SDPA's convention) and True = masked in v4.
    """
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"detr_fast patch: expected a [B, 1, L, S] attention mask, got shape {tuple(mask.shape)}")
    row = mask[:, 0, 0, :]  # [B, S]
    if row.dtype == torch.bool:
        return ~row if bool_means_keep else row
    return row < 0


def _heads(module: nn.Module) -> tuple[int, int]:
    """(number of heads, head dim) of a transformers DETR attention module."""
    head_dim = module.head_dim
    return module.q_proj.out_features // head_dim, head_dim


def _attend(q, k, v, key_padding_mask, dropout_p, scale, out_proj, need_weights):
    """The attention of [B, L, H, D] projections -> (output [B, L, C], weights [B, H, L, S] or None). The fused
    kernel never materializes the weights, so a call that wants them takes the reference, which does."""
    batch, length, heads, head_dim = q.shape
    weights = None
    if need_weights:
        out, weights = reference.attention_with_weights(q, k, v, key_padding_mask, dropout_p, scale)
    else:
        out = ops.attention(q, k, v, key_padding_mask, dropout_p=dropout_p, scale=scale)  # [B, L, H, D]
    return out_proj(out.reshape(batch, length, heads * head_dim)), weights


def _self_attention(module, hidden_states, pos, key_padding_mask, dropout_p, scale, out_proj, need_weights):
    """q, k from hidden_states + pos and v from hidden_states in one projection; [B, L, C] -> [B, L, C]."""
    q, k, v = project_self_attention(hidden_states, pos, module.q_proj, module.k_proj, module.v_proj, _heads(module))
    return _attend(q, k, v, key_padding_mask, dropout_p, scale, out_proj, need_weights)


def _cross_attention(
    module, hidden_states, query_pos, memory, memory_pos, key_padding_mask, dropout_p, scale, out_proj, need_weights
):
    """Queries [B, L, C] (+ query_pos) attend to memory [B, S, C] (keys + memory_pos) -> [B, L, C]."""
    q, k, v = project_cross_attention(
        hidden_states, query_pos, memory, memory_pos, module.q_proj, module.k_proj, module.v_proj, _heads(module)
    )
    return _attend(q, k, v, key_padding_mask, dropout_p, scale, out_proj, need_weights)


# ----------------------------------------------------------------------------- forwards with transformers' signatures


def _wants_weights(module: nn.Module, kwargs: dict) -> bool:
    """Whether this call must return attention weights: output_attentions as passed down, else the config's (v5
    records the weights the attention modules return, so a patched module that returned None would leave empty
    tuples)."""
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def v5_self_attention_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
    """transformers v5 DetrSelfAttention.forward on detr_fast ops; returns (output, weights or None)."""
    dropout_p = self.attention_dropout if self.training else 0.0
    return _self_attention(
        self,
        hidden_states,
        position_embeddings,
        _key_padding(attention_mask, True),
        dropout_p,
        self.scaling,
        self.o_proj,
        _wants_weights(self, kwargs),
    )


def v5_cross_attention_forward(
    self,
    hidden_states,
    key_value_states,
    attention_mask=None,
    position_embeddings=None,
    encoder_position_embeddings=None,
    **kwargs,
):
    """transformers v5 DetrCrossAttention.forward on detr_fast ops; returns (output, weights or None)."""
    dropout_p = self.attention_dropout if self.training else 0.0
    return _cross_attention(
        self,
        hidden_states,
        position_embeddings,
        key_value_states,
        encoder_position_embeddings,
        _key_padding(attention_mask, True),
        dropout_p,
        self.scaling,
        self.o_proj,
        _wants_weights(self, kwargs),
    )


def v4_attention_forward(
    self,
    hidden_states,
    attention_mask=None,
    object_queries=None,
    key_value_states=None,
    spatial_position_embeddings=None,
    output_attentions=False,
    **kwargs,
):
    """transformers v4 DetrAttention.forward (self- or cross-attention) on detr_fast ops; returns (output, weights
    or None)."""
    # v4.3x named the two position embeddings position_embeddings and key_value_position_embeddings.
    object_queries = kwargs.pop("position_embeddings", object_queries)
    spatial_position_embeddings = kwargs.pop("key_value_position_embeddings", spatial_position_embeddings)
    dropout_p = self.dropout if self.training else 0.0
    padding = _key_padding(attention_mask, False)
    if key_value_states is None:
        return _self_attention(
            self, hidden_states, object_queries, padding, dropout_p, self.scaling, self.out_proj, output_attentions
        )
    return _cross_attention(
        self,
        hidden_states,
        object_queries,
        key_value_states,
        spatial_position_embeddings,
        padding,
        dropout_p,
        self.scaling,
        self.out_proj,
        output_attentions,
    )


# ------------------------------------------------------------------------------------------------------- criterion


def make_loss_function(model: nn.Module, criterion_class: type[DetrLoss] = DetrLoss, masks: bool = False):
    """A replacement for transformers' ForObjectDetectionLoss (DetrLoss), DeformableDetrForObjectDetectionLoss
    (FocalDetrLoss) or, with masks, ForSegmentationLoss (DetrLoss with the mask term) that runs detr_fast's
    criterion, built once from the model's config. Same arguments and returns: (loss, loss_dict,
    auxiliary_outputs)."""
    criterion = criterion_class.from_config(model.config, masks=masks)

    def run(logits, labels, device, pred_boxes, pred_masks, config, outputs_class, outputs_coord):
        """logits [B, N, K] (K = C+1, or C for the focal criterion), pred_boxes [B, N, 4], pred_masks [B, N, h, w]
        or None; with auxiliary loss outputs_class [L, B, N, K] and outputs_coord [L, B, N, 4] of every decoder
        layer (the last one is replaced by logits/pred_boxes)."""
        criterion.to(device)
        all_logits, all_boxes = logits[None], pred_boxes[None]  # [1, B, N, C+1], [1, B, N, 4]
        auxiliary_outputs = None
        if config.auxiliary_loss:
            all_logits = torch.cat([outputs_class[:-1], all_logits])  # [L, B, N, C+1]
            all_boxes = torch.cat([outputs_coord[:-1], all_boxes])  # [L, B, N, 4]
            auxiliary_outputs = [{"logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        targets = labels if is_padded(labels) else pad_targets(labels, device=device, num_classes=config.num_labels)
        loss, loss_dict, _ = criterion(all_logits, all_boxes, targets, pred_masks)
        return loss, loss_dict, auxiliary_outputs

    if masks:  # ForSegmentationLoss's signature

        def loss_function(logits, labels, device, pred_boxes, pred_masks, config, outputs_class=None,
                          outputs_coord=None, **kwargs):  # fmt: skip
            return run(logits, labels, device, pred_boxes, pred_masks, config, outputs_class, outputs_coord)

    else:  # ForObjectDetectionLoss's

        def loss_function(logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs):
            return run(logits, labels, device, pred_boxes, None, config, outputs_class, outputs_coord)

    return loss_function


def make_iou_aware_loss_function(model: nn.Module):
    """A replacement for transformers' LwDetrForObjectDetectionLoss (LW-DETR, RF-DETR) that runs
    detr_fast.loss.IouAwareDetrLoss, built once from the model's config: the last layer, the auxiliary layers and
    the encoder proposals matched in one call. Same arguments and returns: (loss, loss_dict, auxiliary_outputs)."""
    criterion = IouAwareDetrLoss.from_config(model.config)

    def loss_function(logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None,
                      enc_outputs_class=None, enc_outputs_coord=None, **kwargs):  # fmt: skip
        """logits [B, N, C], pred_boxes [B, N, 4] (N: the queries of every group); outputs_class [L, B, N, C] and
        outputs_coord [L, B, N, 4] of every decoder layer; enc_outputs_class [B, N, C], enc_outputs_coord [B, N, 4]."""
        criterion.to(device)
        sets_logits, sets_boxes, auxiliary_outputs = [logits], [pred_boxes], None
        if config.auxiliary_loss:
            sets_logits += list(outputs_class[:-1])
            sets_boxes += list(outputs_coord[:-1])
            auxiliary_outputs = [{"logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        sets_logits.append(enc_outputs_class)
        sets_boxes.append(enc_outputs_coord)
        targets = labels if is_padded(labels) else pad_targets(labels, device=device, num_classes=config.num_labels)
        loss, loss_dict, _ = criterion(torch.stack(sets_logits), torch.stack(sets_boxes), targets)  # [S, B, N, ...]
        return loss, loss_dict, auxiliary_outputs

    return loss_function


def make_rt_detr_loss_function(model: nn.Module):
    """A replacement for transformers' RTDetrForObjectDetectionLoss (RT-DETR v1 and v2) that runs
    detr_fast.loss.VarifocalDetrLoss, built once from the model's config. Same arguments and returns: (loss,
    loss_dict, auxiliary_outputs)."""
    criterion = VarifocalDetrLoss.from_config(model.config)

    def loss_function(
        logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, enc_topk_logits=None,
        enc_topk_bboxes=None, denoising_meta_values=None, **kwargs,
    ):  # fmt: skip
        """logits [B, D+N, C] and pred_boxes [B, D+N, 4] of the last layer (D denoising queries first, when
        training); with auxiliary loss outputs_class [B, L, D+N, C] and outputs_coord [B, L, D+N, 4] of every
        decoder layer and the encoder proposals enc_topk_logits [B, N, C], enc_topk_bboxes [B, N, 4]."""
        criterion.to(device)
        meta = denoising_meta_values
        if meta is not None:  # the denoising queries are scored by their fixed assignment, not matched
            logits = torch.split(logits, meta["dn_num_split"], dim=1)[1]  # [B, N, C]
            pred_boxes = torch.split(pred_boxes, meta["dn_num_split"], dim=1)[1]
        all_logits, all_boxes = logits[None], pred_boxes[None]  # [1, B, N, C], [1, B, N, 4]
        auxiliary_outputs, denoising = None, None
        targets = labels if is_padded(labels) else pad_targets(labels, device=device, num_classes=config.num_labels)
        if config.auxiliary_loss:
            if meta is not None:
                dn_class, outputs_class = torch.split(outputs_class, meta["dn_num_split"], dim=2)
                dn_coord, outputs_coord = torch.split(outputs_coord, meta["dn_num_split"], dim=2)
                denoising = (
                    dn_class.transpose(0, 1), dn_coord.transpose(0, 1),  # [L, B, D, C], [L, B, D, 4]
                    denoising_assignment(meta["dn_positive_idx"], meta["dn_num_group"], dn_class.shape[2], device),
                    meta["dn_num_group"],
                )  # fmt: skip
            aux_class = torch.cat([outputs_class[:, :-1].transpose(0, 1), enc_topk_logits[None]])  # [L, B, N, C]
            aux_coord = torch.cat([outputs_coord[:, :-1].transpose(0, 1), enc_topk_bboxes[None]])  # [L, B, N, 4]
            auxiliary_outputs = [{"logits": c, "pred_boxes": b} for c, b in zip(aux_class, aux_coord)]
            all_logits, all_boxes = torch.cat([all_logits, aux_class]), torch.cat([all_boxes, aux_coord])
        loss, loss_dict, _ = criterion(all_logits, all_boxes, targets, denoising)
        return loss, loss_dict, auxiliary_outputs

    return loss_function


def denoising_assignment(positive: list[torch.Tensor], groups: int, num_denoising: int, device) -> torch.Tensor:
    """RT-DETR's fixed assignment of its denoising queries -> [B, D] target index or -1: image b's positive queries
    `positive[b]` ([G * M_b], group by group) take its targets 0..M_b-1 in each of the `groups` groups (the
    counts come from the shapes: no host sync)."""
    assignment = torch.full((len(positive), num_denoising), -1, dtype=torch.int64, device=device)
    for b, queries in enumerate(positive):
        if queries.numel():
            targets = torch.arange(queries.numel() // groups, device=device).repeat(groups)  # [G * M_b]
            assignment[b, queries.to(device)] = targets
    return assignment


# ------------------------------------------------------------------------------------------------ patch / unpatch


def _attention_forwards() -> dict[type, object]:
    """transformers' DETR attention classes of the installed version -> our forward."""
    from transformers.models.detr import modeling_detr

    forwards = {}
    for name, forward in (
        ("DetrSelfAttention", v5_self_attention_forward),
        ("DetrCrossAttention", v5_cross_attention_forward),
        ("DetrAttention", v4_attention_forward),
    ):
        cls = getattr(modeling_detr, name, None)
        if cls is not None:
            forwards[cls] = forward
    return forwards


def patch(model: nn.Module, attention: bool = True, criterion: bool = True) -> nn.Module:
    """Make a transformers DETR or DETR-family model use detr_fast in place.

    DetrForObjectDetection (or DetrModel, attention only): the attention and the whole criterion (DetrLoss).
    The DETR descendants of detr_family.FAMILY_MODELS get a whole detr_fast criterion (every layer matched at once,
    sync-free): FocalDetrLoss for Conditional, DAB and Deformable DETR, VarifocalDetrLoss for RT-DETR v1/v2,
    IouAwareDetrLoss for LW-DETR and RF-DETR detection, DetrLoss / FocalDetrLoss with the mask term for
    transformers' DetrForSegmentation and ConditionalDetrForSegmentation; the others (D-FINE, DEIMv2, RF-DETR
    instance segmentation, Grounding DINO) keep their own criterion with detr_fast's batched Hungarian matcher
    (detr_family.batched_matchers). The DETR attention modules among them (DetrForSegmentation's) are replaced too.

    Args:
        model: the transformers model; its weights are used as they are.
        attention: replace the forward of every DETR attention module.
        criterion: replace the model's loss function (the criterion, or the matchers, as above; transformers
            >= 4.46).
    Returns:
        the same model object.
    """
    if getattr(model, PATCHED, False):
        return model
    family = type(model).__name__ in FAMILY_MODELS
    forwards = _attention_forwards()
    modules = [m for m in model.modules() if type(m) in forwards] if attention else []
    if attention and not modules and not family:
        raise TypeError(
            f"detr_fast patch: {type(model).__name__} holds no transformers DETR attention module "
            f"(looked for {', '.join(cls.__name__ for cls in forwards)}) and is none of the DETR-family models "
            f"whose matching detr_fast replaces ({', '.join(FAMILY_MODELS)})"
        )
    if criterion:
        if not family and not hasattr(model, "class_labels_classifier"):
            raise TypeError(
                f"detr_fast patch: criterion=True needs a DetrForObjectDetection or one of {', '.join(FAMILY_MODELS)}, "
                f"got {type(model).__name__}"
            )
        if not hasattr(type(model), "loss_function"):
            import transformers

            raise TypeError(
                f"detr_fast patch: transformers {transformers.__version__} computes DETR's loss inline; "
                "the criterion can be replaced from 4.46 on (pass criterion=False to patch attention only)"
            )
    for module in modules:
        module.forward = MethodType(forwards[type(module)], module)
    if criterion:
        # The original is whatever the instance had (transformers keeps a set loss function in _loss_function).
        model._detr_fast_loss_function = model.__dict__.get("_loss_function")
        if type(model).__name__ in FOCAL_CRITERION_MODELS:
            model.loss_function = make_loss_function(model, FocalDetrLoss)
        elif type(model).__name__ in VARIFOCAL_CRITERION_MODELS:
            model.loss_function = make_rt_detr_loss_function(model)
        elif type(model).__name__ in IOU_AWARE_CRITERION_MODELS:
            model.loss_function = make_iou_aware_loss_function(model)
        elif type(model).__name__ in SEGMENTATION_CRITERION_MODELS:
            criterion_class = SEGMENTATION_CRITERION_MODELS[type(model).__name__]
            model.loss_function = make_loss_function(model, criterion_class, masks=True)
        elif family:
            model.loss_function = batched_loss_function(model.loss_function)
        else:
            model.loss_function = make_loss_function(model)
    setattr(model, PATCHED, True)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(model): the original attention forwards and loss function."""
    if not getattr(model, PATCHED, False):
        return model
    for module in model.modules():
        if (
            "forward" in module.__dict__
            and isinstance(module.forward, MethodType)
            and module.forward.__func__ in (v5_self_attention_forward, v5_cross_attention_forward, v4_attention_forward)
        ):
            del module.forward
    if "_detr_fast_loss_function" in model.__dict__:
        original = model.__dict__.pop("_detr_fast_loss_function")
        if original is None:
            del model._loss_function
        else:
            model._loss_function = original
    delattr(model, PATCHED)
    return model
