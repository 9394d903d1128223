"""Weights in and out: state dicts and configs only (building a model is the model class's business, see
detr_fast.model.pretrained). Conversions between transformers v4/v5 and facebookresearch/detr state dicts, safetensors
checkpoints, configs read off checkpoints.

detr_fast's own parameter names are transformers v5's. Layouts:
- "detr_fast" (= transformers v5): model.backbone.model.*, self_attn.o_proj, mlp.fc1, model.position_embedding.*
- "transformers-v4": model.backbone.conv_encoder.model.*, self_attn.out_proj, fc1, model.backbone.position_embedding.*
- "original" (facebookresearch/detr): backbone.0.body.*, transformer.encoder.layers.i.self_attn.in_proj_weight
  ([Wq; Wk; Wv]), linear1, norm1..3, multihead_attn, class_embed, bbox_embed, query_embed, input_proj.
In every layout a segmentation model holds the detector under the prefix `detr.` and its own heads beside it; the
detector rules apply to the keys under that prefix, the head rules to the heads' keys (`mask_head.`,
`bbox_attention.`), which transformers v4 and the original DETR name alike (lay1..lay5, gn1..gn5, adapter1..3,
out_lay, q_linear/k_linear) and v5 by module (conv1.conv, fpn_stages.i.refine.norm, q_proj, ...).
"""

from __future__ import annotations

import argparse
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
DETECTOR_PREFIXES = ("", "detr.")  # a segmentation model wraps the detector as `detr`

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
_CONV_BLOCK = (("conv", "lay"), ("norm", "gn"))  # a mask-head ConvBlock's parts and their short names
# Segmentation heads: (detr_fast (= v5) prefix, transformers v4 and original prefix), the same names in both.
_HEAD_NAMES = [
    *((f"mask_head.conv{i}.{part}.", f"mask_head.{short}{i}.") for i in (1, 2) for part, short in _CONV_BLOCK),
    *(
        pair
        for stage in range(3)
        for pair in (
            (f"mask_head.fpn_stages.{stage}.fpn_adapter.", f"mask_head.adapter{stage + 1}."),
            *((f"mask_head.fpn_stages.{stage}.refine.{part}.", f"mask_head.{short}{stage + 3}.")
              for part, short in _CONV_BLOCK),
        )
    ),
    ("mask_head.output_conv.", "mask_head.out_lay."),
    *((f"bbox_attention.{p}_proj.", f"bbox_attention.{p}_linear.") for p in "qk"),
]  # fmt: skip
_HEAD_RULES = [("^" + re.escape(ours), theirs) for ours, theirs in _HEAD_NAMES]
_HEAD_INVERSE = [("^" + re.escape(theirs), ours) for ours, theirs in _HEAD_NAMES]
_IN_PROJ = re.compile(r"^(.*)\.in_proj_(weight|bias)$")
_QKV = re.compile(r"^(.*)\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[str, str]], prefix: str = "", heads: list[tuple[str, str]] = ()) -> str:
    """`key` renamed by `rules` if it lies under `prefix` (the detector's keys), else by the segmentation `heads`
    rules."""
    if not key.startswith(prefix):
        for pattern, replacement in heads:
            key = re.sub(pattern, replacement, key)
        return key
    key = key[len(prefix) :]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return prefix + key


def detector_prefix(state_dict: Mapping[str, Any]) -> str:
    """The prefix under which a state dict holds the detector: "" (a detection model) or "detr." (a segmentation
    model, in any layout)."""
    keys = list(state_dict)
    if keys and all(not k.startswith(("model.", "transformer.", "backbone.")) for k in keys):
        if any(k.startswith("detr.") for k in keys):
            return "detr."
    return ""


def detector_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The detector's entries of a state dict with its prefix removed (the heads of a segmentation model left out)."""
    prefix = detector_prefix(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Which of LAYOUTS a state dict is in, from its key names (a `detr.` prefix is recognized)."""
    keys = list(detector_keys(state_dict))
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
    prefix = detector_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # frozen BatchNorm keeps no step counter
            continue
        if layout == "detr_fast":
            out[key] = value
        elif layout == "transformers-v4":
            out[_rename(key, _V4_INVERSE, prefix, _HEAD_INVERSE)] = value
        elif layout == "original":
            fused = _IN_PROJ.match(key) if key.startswith(prefix) else None
            if fused:  # nn.MultiheadAttention stores [Wq; Wk; Wv] in one tensor
                module = _rename(fused.group(1) + ".", _ORIGINAL_RULES, prefix)
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"{module}{name}_proj.{fused.group(2)}"] = part.clone()
            else:
                out[_rename(key, _ORIGINAL_RULES, prefix, _HEAD_INVERSE)] = value
        else:
            raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    return out


def from_detr_fast(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Convert a detr_fast state dict to `layout` ("detr_fast" = transformers v5, "transformers-v4", "original")."""
    if layout == "detr_fast":
        return dict(state_dict)
    prefix = detector_prefix(state_dict)
    if layout == "transformers-v4":
        return {_rename(k, _V4_RULES, prefix, _HEAD_RULES): v for k, v in state_dict.items()}
    if layout != "original":
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        qkv = _QKV.match(key) if key.startswith(prefix) else None
        if qkv:
            fused.setdefault((qkv.group(1), qkv.group(3)), {})[qkv.group(2)] = value
        else:
            out[_rename(key, _ORIGINAL_INVERSE, prefix, _HEAD_RULES)] = value
    for (module, kind), parts in fused.items():
        out[_rename(module + ".", _ORIGINAL_INVERSE, prefix) + f"in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


_RESNET_DEPTHS = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> DetrConfig:
    """A DetrConfig read off the shapes of a detr_fast state dict (of a detection model, or of a segmentation model
    whose detector sits under `detr.`). Head counts and switches that leave no trace in the weights (attention
    heads, auxiliary_loss, dilation) come from `overrides` or the defaults."""
    state_dict = detector_keys(state_dict)

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
        warnings.warn(
            f"infer_config: the weights do not record {' and '.join(assumed)}; assuming DETR's default "
            f"({DetrConfig.encoder_attention_heads}); give a config (config.json, or config=...) if they "
            "differ",
            stacklevel=2,
        )
    return DetrConfig(**values)


# DetrConfig field -> the argument of facebookresearch/detr's main.py that holds it.
_ORIGINAL_ARGS = {
    "backbone": "backbone",
    "dilation": "dilation",
    "position_embedding_type": "position_embedding",
    "encoder_layers": "enc_layers",
    "decoder_layers": "dec_layers",
    "encoder_ffn_dim": "dim_feedforward",
    "d_model": "hidden_dim",
    "dropout": "dropout",
    "encoder_attention_heads": "nheads",
    "num_queries": "num_queries",
    "auxiliary_loss": "aux_loss",
    "class_cost": "set_cost_class",
    "bbox_cost": "set_cost_bbox",
    "giou_cost": "set_cost_giou",
    "mask_loss_coefficient": "mask_loss_coef",
    "dice_loss_coefficient": "dice_loss_coef",
    "bbox_loss_coefficient": "bbox_loss_coef",
    "giou_loss_coefficient": "giou_loss_coef",
    "eos_coefficient": "eos_coef",
}


def original_args(config: DetrConfig, masks: bool = False) -> argparse.Namespace:
    """The argparse arguments of facebookresearch/detr's main.py that describe `config` (what an original
    checkpoint stores beside its weights; `masks` for a segmentation model); one head count and one FFN width for
    encoder and decoder, as there."""
    values = {theirs: getattr(config, ours) for ours, theirs in _ORIGINAL_ARGS.items()}
    values.update(pre_norm=False, masks=masks, num_classes=config.num_labels)
    return argparse.Namespace(**values)


def _original_overrides(args: Any) -> dict[str, Any]:
    """Config fields recorded in an original DETR checkpoint's argparse args."""
    if args is None:
        return {}
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {ours: values[theirs] for ours, theirs in _ORIGINAL_ARGS.items() if theirs in values}
    if "nheads" in values:
        out["decoder_attention_heads"] = values["nheads"]
    if "dim_feedforward" in values:
        out["decoder_ffn_dim"] = values["dim_feedforward"]
    if out.get("dilation") is not None:
        out["dilation"] = bool(out["dilation"])
    return out


def original_checkpoint(state_dict: Mapping[str, torch.Tensor], config: DetrConfig) -> dict[str, Any]:
    """What `torch.save` writes for facebookresearch/detr: {"model": its state dict, "args": its arguments}, plus
    our config ("model_config", which the original code ignores) so that the round trip keeps every field (labels
    included) and the outputs stay identical."""
    return {
        "model": from_detr_fast(state_dict, "original"),
        "args": original_args(config, masks=detector_prefix(state_dict) == "detr."),
        "model_config": config.to_dict(),
    }


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DetrConfig | None]:
    """Read a checkpoint file or directory into a detr_fast state dict and its config (None if none is stored).

    Accepts: a directory with config.json and model.safetensors / pytorch_model.bin (ours or transformers'); a
    .safetensors file; a .pth/.pt/.bin file (loaded with weights_only=True), including original DETR checkpoints
    ({"model": state_dict, "args": Namespace}) and detr_fast training checkpoints (their "model_config").
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
        if isinstance(raw.get("model_config"), Mapping):  # written by detr_fast: the whole config
            config = DetrConfig.from_dict(dict(raw["model_config"]))
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


def load_fitting(model: nn.Module, state_dict: Mapping[str, torch.Tensor], skip: tuple[str, ...] = ()) -> list[str]:
    """Load every tensor of `state_dict` that the model has under the same name and shape (fine-tuning from a
    checkpoint of another dataset or size); keys starting with one of `skip` are left as they are. Returns one line
    per model tensor that was not loaded, saying why."""
    expected = model.state_dict()
    loaded, report = {}, []
    for key, value in expected.items():
        theirs = state_dict.get(key)
        if key.startswith(skip):
            report.append(f"{key}: left at its initialization")
        elif theirs is None:
            report.append(f"{key}: not in the checkpoint")
        elif theirs.shape != value.shape:
            report.append(f"{key}: checkpoint {tuple(theirs.shape)} vs model {tuple(value.shape)}")
        else:
            loaded[key] = theirs
    model.load_state_dict(loaded, strict=False)
    return report


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], **metadata: str) -> None:
    """Write tensors (moved to the CPU, made contiguous) as a safetensors file; the folder is created if needed."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", **metadata})


def write_pretrained(directory: str | os.PathLike, config: DetrConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """config.json + model.safetensors in `directory` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    config.save(os.path.join(directory, "config.json"))
    write_safetensors(os.path.join(directory, "model.safetensors"), state_dict, library="detr_fast")
