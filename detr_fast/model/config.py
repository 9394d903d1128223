"""DetrConfig: transformers' DETR configuration fields and defaults, as a plain dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# The entry of a transformers config that holds the fields only detr_fast has.
TRANSFORMERS_EXTRA = "detr_fast"
DEFAULT_OUT_INDICES = [1, 2, 3, 4]  # the backbone levels DETR reads (strides 4 to 32), transformers' default too


def _own_backbone_kwargs(kwargs: dict | None) -> dict | None:
    """The timm arguments of a transformers config that change our backbone: without in_chans (num_channels sets
    it) and without out_indices when they are DETR's default levels; None when nothing is left."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "in_chans" and v is not None}
    if list(kwargs.get("out_indices", DEFAULT_OUT_INDICES)) == DEFAULT_OUT_INDICES:
        kwargs.pop("out_indices", None)
    return kwargs or None


@dataclass
class DetrConfig:
    """Configuration of DetrForObjectDetection, with transformers' field names and defaults.

    Two differences from transformers' defaults, both forced by running without network access: the backbone is
    a timm model (`use_timm_backbone` must stay True) and `use_pretrained_backbone` defaults to False (timm would
    download the ImageNet weights; set it True where the hub is reachable or the weights are cached).

    `original_detr` switches the two places where transformers differs from facebookresearch/detr to the
    original's behaviour: (1) transformers applies `dropout` to the encoder input, the original does not; (2) with
    `auxiliary_loss`, transformers feeds each decoder layer the layer-normed output of the previous one (and
    layer-norms the last output twice), while the original normalizes only the copies the heads read. Both only
    matter in training (1) or with auxiliary_loss (2); weights are interchangeable either way.
    """

    num_labels: int = 2
    num_channels: int = 3
    num_queries: int = 100
    encoder_layers: int = 6
    encoder_ffn_dim: int = 2048
    encoder_attention_heads: int = 8
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    decoder_attention_heads: int = 8
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "relu"
    d_model: int = 256
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    auxiliary_loss: bool = False
    position_embedding_type: str = "sine"
    backbone: str = "resnet50"
    use_timm_backbone: bool = True
    use_pretrained_backbone: bool = False
    backbone_kwargs: dict[str, Any] | None = None
    dilation: bool = False
    class_cost: float = 1
    bbox_cost: float = 5
    giou_cost: float = 2
    mask_loss_coefficient: float = 1
    dice_loss_coefficient: float = 1
    bbox_loss_coefficient: float = 5
    giou_loss_coefficient: float = 2
    eos_coefficient: float = 0.1
    id2label: dict[int, str] | None = None
    category_ids: list[int] | None = None  # the dataset's category id of each label (COCO results), when trained
    architectures: list[str] | None = None  # the model class that saved it, as transformers records
    output_attentions: bool = False  # the defaults of the forward's arguments of the same names
    output_hidden_states: bool = False
    original_detr: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.use_timm_backbone:
            raise ValueError(
                "DetrConfig: use_timm_backbone=False is not supported; detr_fast builds its backbone with timm"
            )
        if self.position_embedding_type not in ("sine", "learned"):
            raise ValueError(
                f"DetrConfig: position_embedding_type must be 'sine' or 'learned', got {self.position_embedding_type!r}"
            )
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if self.d_model % heads:
                raise ValueError(f"DetrConfig: d_model={self.d_model} is not divisible by {name}={heads}")
        if self.d_model % 2:
            raise ValueError(f"DetrConfig: d_model={self.d_model} must be even (half for x, half for y positions)")
        if self.category_ids is not None:
            self.category_ids = [int(c) for c in self.category_ids]
            if len(self.category_ids) != self.num_labels or len(set(self.category_ids)) != self.num_labels:
                raise ValueError(
                    f"DetrConfig: category_ids {self.category_ids} must be num_labels={self.num_labels} distinct ids"
                )
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if len(self.id2label) != self.num_labels:
                raise ValueError(
                    f"DetrConfig: id2label has {len(self.id2label)} entries but num_labels={self.num_labels}"
                )

    # transformers' attribute aliases
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.encoder_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetrConfig:
        """Build from a dict of fields; unknown keys are kept in `extra` (so transformers' config.json loads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names and k != "extra"}
        extra = {**values.get("extra", {}), **{k: v for k, v in values.items() if k not in names}}
        return cls(**known, extra=extra)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DetrConfig:
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"DetrConfig.load: cannot read {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"DetrConfig.load: {path} holds a {type(values).__name__}, expected a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_transformers(cls, hf_config: Any) -> DetrConfig:
        """Read a transformers DetrConfig (v4 fields, or v5 with a timm `backbone_config`), and the fields only
        detr_fast has where `to_transformers` recorded them (its `detr_fast` entry)."""
        values = {f.name: getattr(hf_config, f.name) for f in dataclasses.fields(cls) if hasattr(hf_config, f.name)}
        values.pop("extra", None)
        values.pop("original_detr", None)
        values.pop(TRANSFORMERS_EXTRA, None)
        backbone_config = getattr(hf_config, "backbone_config", None)
        if backbone_config is not None:  # v5: the timm model lives in a TimmBackboneConfig
            kind = getattr(backbone_config, "model_type", None)
            if kind != "timm_backbone":
                raise ValueError(
                    f"DetrConfig.from_transformers: backbone_config of type {kind!r} is not supported; detr_fast "
                    "needs a timm backbone (model_type 'timm_backbone')"
                )
            values["backbone"] = backbone_config.backbone
            values["use_pretrained_backbone"] = bool(getattr(backbone_config, "use_pretrained_backbone", False))
            values["use_timm_backbone"] = True
            values["dilation"] = bool(getattr(backbone_config, "output_stride", None) == 16 or values.get("dilation"))
            values["backbone_kwargs"] = {"out_indices": getattr(backbone_config, "out_indices", None)}
        elif not getattr(hf_config, "use_timm_backbone", True):
            raise ValueError(
                "DetrConfig.from_transformers: use_timm_backbone=False is not supported; "
                "detr_fast needs a timm backbone"
            )
        values["dilation"] = bool(values.get("dilation") or False)
        values["backbone_kwargs"] = _own_backbone_kwargs(values.get("backbone_kwargs"))
        values["num_labels"] = hf_config.num_labels
        id2label = getattr(hf_config, "id2label", None)
        values["id2label"] = {int(k): v for k, v in id2label.items()} if id2label else None
        values.update(getattr(hf_config, TRANSFORMERS_EXTRA, None) or {})
        return cls(**values)

    def to_transformers(self) -> Any:
        """The equivalent transformers DetrConfig (needs transformers installed). The fields transformers has no
        place for (`original_detr`; `backbone_kwargs`, which would make transformers v5 skip building its timm
        backbone config; both versions default to the out_indices (1, 2, 3, 4) detr_fast uses) travel in an entry
        `detr_fast` that transformers keeps and ignores, so that `from_transformers` gets the same config back."""
        from transformers import DetrConfig as HFDetrConfig

        kept_apart = {"original_detr", "backbone_kwargs", "use_pretrained_backbone", "category_ids"}
        names = {f.name for f in dataclasses.fields(self)} - {"extra", "id2label"} - kept_apart
        kwargs = {name: getattr(self, name) for name in names}
        kwargs["use_pretrained_backbone"] = False
        if self.id2label is not None:
            kwargs["id2label"] = dict(self.id2label)
        hf_config = HFDetrConfig(**kwargs)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        extra = {name: getattr(self, name) for name in sorted(kept_apart) if getattr(self, name) != defaults[name]}
        if extra:
            setattr(hf_config, TRANSFORMERS_EXTRA, extra)
        return hf_config
