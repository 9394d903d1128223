"""The command-line options of `detr-fast train`: one per TrainConfig field (with config.HELP's line and every
preset's default) and per model setting, parsed into the TrainConfig of a preset."""

from __future__ import annotations

import argparse
import dataclasses

from ..model import ARCHITECTURES, DetrConfig
from ..runtime import AMP_MODES
from .config import HELP, PRESETS, TrainConfig, preset

CHOICES = {
    "dataset": ("synthetic", "coco"),
    "amp": AMP_MODES,
    "on_bad": ("raise", "skip"),
    "architecture": tuple(ARCHITECTURES),
}
# TrainConfig fields set through other options (the model's settings) or not from the command line.
NOT_OPTIONS = {"model", "synthetic_spec"}
# --option -> (DetrConfig field, type, help) of the model settings a run may change.
MODEL_OPTIONS = {
    "backbone": ("backbone", str, "the timm backbone (resnet50, resnet18, resnet101, ...)"),
    "pretrained_backbone": (
        "use_pretrained_backbone",
        bool,
        "start the backbone from timm's ImageNet weights (downloaded from the hub); --no-pretrained-backbone "
        "trains offline from random weights",
    ),
    "num_queries": ("num_queries", int, "object queries (the most objects one image can have)"),
    "d_model": ("d_model", int, "transformer width"),
    "encoder_layers": ("encoder_layers", int, "transformer encoder layers"),
    "decoder_layers": ("decoder_layers", int, "transformer decoder layers"),
    "dropout": ("dropout", float, "dropout in the transformer"),
    "auxiliary_loss": ("auxiliary_loss", bool, "losses on every decoder layer, as DETR trains"),
}


def _sizes(text: str) -> int | None:
    """One size of a list option; 'none' stands for the whole option's None."""
    return None if text.lower() == "none" else int(text)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _parser_arguments(annotation: str) -> dict:
    """add_argument keywords for a TrainConfig field of type `annotation` (a string under postponed annotations)."""
    if annotation == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("tuple"):
        return {"type": _sizes, "nargs": "+", "metavar": "SIZE"}
    kind = {"int": int, "float": float, "str": str}[annotation.split(" | ")[0]]
    return {"type": _optional(kind) if "None" in annotation else kind}


def _shown(value: object) -> str:
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _default_text(name: str) -> str:
    """What the presets set `name` to: one value, or each preset's."""
    values = {preset_name: _shown(getattr(preset(preset_name), name)) for preset_name in sorted(PRESETS)}
    if len(set(values.values())) == 1:
        return f" (default: {next(iter(values.values()))})"
    return f" (default: {'; '.join(f'{p}: {v}' for p, v in values.items())})"


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field and model setting as an option, unset unless given (the preset decides)."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="synthetic", help="the run's starting configuration"
    )
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_OPTIONS:
            continue
        keywords = _parser_arguments(field.type)
        if field.name in CHOICES:
            keywords["choices"] = CHOICES[field.name]
        help_text = HELP[field.name] + _default_text(field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), default=None, help=help_text, **keywords)
    for name, (config_field, kind, help_text) in MODEL_OPTIONS.items():
        keywords = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        values = {p: preset(p).model.get(config_field, getattr(DetrConfig, config_field)) for p in sorted(PRESETS)}
        defaults = "; ".join(f"{p}: {v}" for p, v in values.items())
        parser.add_argument(
            "--" + name.replace("_", "-"), default=None, help=f"{help_text} (default: {defaults})", **keywords
        )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset with the options given on the command line applied (a list option given as 'none' is None)."""
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if field.name in NOT_OPTIONS or value is None:
            continue
        if isinstance(value, list):  # 'none' stands for None, or for no sizes where the field takes no None
            value = tuple(value) if None not in value else None if "None" in field.type else ()
        overrides[field.name] = value
    model = {
        config_field: getattr(args, name)
        for name, (config_field, _, _) in MODEL_OPTIONS.items()
        if getattr(args, name, None) is not None
    }
    return preset(args.preset, model=model, **overrides)
