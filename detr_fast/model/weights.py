"""Weights in and out: transformers v4/v5 and facebookresearch/detr state dicts, safetensors checkpoints.

detr_fast's own parameter names are transformers v5's. Layouts:
- "detr_fast" (= transformers v5): model.backbone.model.*, self_attn.o_proj, mlp.fc1, model.position_embedding.*
- "transformers-v4": model.backbone.conv_encoder.model.*, self_attn.out_proj, fc1, model.backbone.position_embedding.*
- "original" (facebookresearch/detr): backbone.0.body.*, transformer.encoder.layers.i.self_attn.in_proj_weight
  ([Wq; Wk; Wv]), linear1, norm1..3, multihead_attn, class_embed, bbox_embed, query_embed, input_proj.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import DetrConfig

LAYOUTS = ("detr_fast", "transformers-v4", "original")

# (pattern in detr_fast keys, replacement in transformers v4 keys); applied in order, reversed for v4 -> ours.
_V4_RULES = [
    (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
    (r"^model\.position_embedding\.", "model.backbone.position_embedding."),
    (r"\.(self_attn|encoder_attn)\.o_proj\.", r".\1.out_proj."),
    (r"(layers\.\d+)\.mlp\.(fc[12])\.", r"\1.\2."),
]
_V4_INVERSE = [
    (r"^model\.backbone\.conv_encoder\.model\.", "model.backbone.model."),
    (r"^model\.backbone\.position_embedding\.", "model.position_embedding."),
    (r"\.(self_attn|encoder_attn)\.out_proj\.", r".\1.o_proj."),
    (r"(layers\.\d+)\.(fc[12])\.", r"\1.mlp.\2."),
]
# facebookresearch/detr -> detr_fast, for every key except the fused in_proj tensors.
_ORIGINAL_RULES = [
    (r"^backbone\.0\.body\.", "model.backbone.model."),
    (r"^backbone\.1\.row_embed\.", "model.position_embedding.row_embeddings."),
    (r"^backbone\.1\.col_embed\.", "model.position_embedding.column_embeddings."),
    (r"^input_proj\.", "model.input_projection."),
    (r"^query_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.(encoder|decoder)\.layers\.", r"model.\1.layers."),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.multihead_attn\.", ".encoder_attn."),
    (r"\.linear([12])\.", r".mlp.fc\1."),
    (r"(decoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm2\.", r"\1.encoder_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm3\.", r"\1.final_layer_norm."),
    (r"(encoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"(encoder\.layers\.\d+)\.norm2\.", r"\1.final_layer_norm."),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.", "bbox_predictor."),
]
_ORIGINAL_INVERSE = [
    (r"^model\.backbone\.model\.", "backbone.0.body."),
    (r"^model\.position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^model\.position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.mlp\.fc([12])\.", r".linear\1."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]
_IN_PROJ = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
_QKV = re.compile(r"^(.*)\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Which of LAYOUTS a state dict is in, from its key names."""
    keys = list(state_dict)
    if any(k.startswith("transformer.") or k.startswith("backbone.0.body.") for k in keys):
        return "original"
    if any(k.startswith("model.backbone.conv_encoder.") or ".out_proj." in k for k in keys):
        return "transformers-v4"
    if any(k.startswith("model.backbone.model.") for k in keys):
        return "detr_fast"
    raise ValueError(
        "cannot tell the layout of this state dict (neither detr_fast/transformers v5, transformers v4 nor "
        f"facebookresearch/detr keys); first keys: {keys[:5]}"
    )


def to_detr_fast(state_dict: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a state dict from `layout` (detected when None) to detr_fast's names."""
    layout = layout or detect_layout(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # frozen BatchNorm keeps no step counter
            continue
        if layout == "detr_fast":
            out[key] = value
        elif layout == "transformers-v4":
            out[_rename(key, _V4_INVERSE)] = value
        elif layout == "original":
            fused = _IN_PROJ.match(key)
            if fused:  # nn.MultiheadAttention stores [Wq; Wk; Wv] in one tensor
                prefix = _rename(fused.group(1) + ".", _ORIGINAL_RULES)
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"{prefix}{name}_proj.{fused.group(2)}"] = part.clone()
            else:
                out[_rename(key, _ORIGINAL_RULES)] = value
        else:
            raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    return out


def from_detr_fast(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Convert a detr_fast state dict to `layout` ("detr_fast" = transformers v5, "transformers-v4", "original")."""
    if layout == "detr_fast":
        return dict(state_dict)
    if layout == "transformers-v4":
        return {_rename(k, _V4_RULES): v for k, v in state_dict.items()}
    if layout != "original":
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        qkv = _QKV.match(key)
        if qkv:
            fused.setdefault((qkv.group(1), qkv.group(3)), {})[qkv.group(2)] = value
        else:
            out[_rename(key, _ORIGINAL_INVERSE)] = value
    for (prefix, kind), parts in fused.items():
        out[_rename(prefix + ".", _ORIGINAL_INVERSE) + f"in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


_RESNET_DEPTHS = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> DetrConfig:
    """A DetrConfig read off the shapes of a detr_fast state dict. Head counts and switches that leave no trace
    in the weights (attention heads, auxiliary_loss, dilation) come from `overrides` or the defaults."""

    def count(prefix: str) -> int:
        indices = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(indices) + 1 if indices else 0

    try:
        queries = state_dict["model.query_position_embeddings.weight"]
        values: dict[str, Any] = {
            "num_queries": queries.shape[0],
            "d_model": queries.shape[1],
            "encoder_layers": count("model.encoder.layers."),
            "decoder_layers": count("model.decoder.layers."),
            "encoder_ffn_dim": state_dict["model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "decoder_ffn_dim": state_dict["model.decoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_labels": state_dict["class_labels_classifier.weight"].shape[0] - 1,
            "position_embedding_type": "learned"
            if "model.position_embedding.row_embeddings.weight" in state_dict
            else "sine",
        }
    except KeyError as error:
        raise ValueError(f"cannot infer a DetrConfig: the state dict has no {error.args[0]!r}") from None
    blocks = tuple(count(f"model.backbone.model.layer{i}.") for i in range(1, 5))
    bottleneck = "model.backbone.model.layer1.0.conv3.weight" in state_dict
    if "backbone" not in overrides:
        if (*blocks, bottleneck) not in _RESNET_DEPTHS:
            raise ValueError(f"cannot infer the backbone (ResNet blocks per stage {blocks}); pass backbone=...")
        values["backbone"] = _RESNET_DEPTHS[(*blocks, bottleneck)]
    values.update(overrides)
    assumed = [name for name in ("encoder_attention_heads", "decoder_attention_heads") if name not in values]
    if assumed:
        # The head count changes the outputs but not a single weight shape: say what was assumed.
        warnings.warn(f"infer_config: the weights do not record {' and '.join(assumed)}; assuming DETR's default "
                      f"({DetrConfig.encoder_attention_heads}); give a config (config.json, or config=...) if they "
                      "differ", stacklevel=2)
    return DetrConfig(**values)


def _original_overrides(args: Any) -> dict[str, Any]:
    """Config fields recorded in an original DETR checkpoint's argparse args."""
    if args is None:
        return {}
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {}
    for ours, theirs in (
        ("encoder_attention_heads", "nheads"),
        ("decoder_attention_heads", "nheads"),
        ("dilation", "dilation"),
        ("auxiliary_loss", "aux_loss"),
        ("dropout", "dropout"),
    ):
        if theirs in values:
            out[ours] = values[theirs]
    if "backbone" in values:
        out["backbone"] = values["backbone"]
    if out.get("dilation") is not None:
        out["dilation"] = bool(out["dilation"])
    return out


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DetrConfig | None]:
    """Read a checkpoint file or directory into a detr_fast state dict and its config (None if none is stored).

    Accepts: a directory with config.json and model.safetensors / pytorch_model.bin (ours or transformers'); a
    .safetensors file; a .pth/.pt/.bin file (loaded with weights_only=True), including original DETR checkpoints
    ({"model": state_dict, "args": Namespace}).
    """
    path = os.fspath(path)
    config = None
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if os.path.exists(config_path):
            config = _read_config_json(config_path)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                state_dict, _ = read_checkpoint(os.path.join(path, name))
                return state_dict, config
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    sibling = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(sibling):
        config = _read_config_json(sibling)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle errors, truncated zip archives, unsafe globals: all a bad file here
            raise ValueError(
                f"{path}: not a loadable weights-only torch checkpoint ({type(error).__name__}: {error})"
            ) from error
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: holds a {type(raw).__name__}, expected a state dict")
    args = None
    if "model" in raw and isinstance(raw["model"], Mapping):  # original DETR / training checkpoints
        args = raw.get("args")
        raw = raw["model"]
    if not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: the state dict holds values that are not tensors")
    layout = detect_layout(raw)
    state_dict = to_detr_fast(raw, layout)
    if config is None and layout == "original":
        # The original's forward, not transformers' (no dropout on the encoder input; with aux loss, the decoder
        # feeds each layer's raw output on): the weights were trained with it.
        config = infer_config(state_dict, original_detr=True, **_original_overrides(args))
    return state_dict, config


def _read_config_json(path: str) -> DetrConfig:
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    if values.get("model_type") == "detr":  # a transformers config.json
        return DetrConfig.from_transformers(_AttributeView(values))
    return DetrConfig.from_dict(values)


class _AttributeView:
    """Attribute access over a transformers config.json dict, for DetrConfig.from_transformers."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)
        if "num_labels" not in self._values and "id2label" in self._values:
            self._values["num_labels"] = len(self._values["id2label"])
        backbone = self._values.get("backbone_config")
        if isinstance(backbone, Mapping):
            self._values["backbone_config"] = _AttributeView(backbone)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that fails with the missing and unexpected key names (and the shape mismatches)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """config.json + model.safetensors in `directory` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.config.save(os.path.join(directory, "config.json"))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt", "library": "detr_fast"})


def model_for_weights(config: DetrConfig) -> nn.Module:
    """A DetrForObjectDetection of `config` whose weights are about to be loaded: built without fetching ImageNet
    backbone weights (use_pretrained_backbone, set in hub configs and the coco-r50 preset) that the load would
    overwrite, and that an offline machine cannot download; the model keeps `config` as given."""
    from .detr import DetrForObjectDetection

    model = DetrForObjectDetection(dataclasses.replace(config, use_pretrained_backbone=False))
    model.config = config
    return model


def from_pretrained(path: str | os.PathLike, config: DetrConfig | None = None) -> nn.Module:
    state_dict, stored = read_checkpoint(path)
    config = config or stored or infer_config(state_dict)
    model = model_for_weights(config)
    load_into(model, state_dict, os.fspath(path))
    return model


def from_transformers(hf_model: nn.Module) -> nn.Module:
    model = model_for_weights(DetrConfig.from_transformers(hf_model.config))
    load_into(model, to_detr_fast(hf_model.state_dict()), f"{type(hf_model).__name__} (transformers)")
    return model.to(next(hf_model.parameters()).device)


def to_transformers(model: nn.Module) -> nn.Module:
    from transformers import DetrForObjectDetection as HFDetrForObjectDetection

    hf_model = HFDetrForObjectDetection(model.config.to_transformers())
    layout = detect_layout(hf_model.state_dict())
    state_dict = from_detr_fast(model.state_dict(), layout)
    expected = hf_model.state_dict()
    # transformers may keep BatchNorm step counters that frozen BatchNorm does not have.
    state_dict.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked")})
    load_into(hf_model, state_dict, "a detr_fast model exported to transformers")
    return hf_model.to(next(model.parameters()).device).eval()
