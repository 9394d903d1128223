"""DetrImageProcessor: transformers' interface and results (its torchvision backend), without transformers.

    processor = DetrImageProcessor()                       # or .from_pretrained(model_dir)
    inputs = processor(images, annotations=..., return_tensors="pt")   # pixel_values, pixel_mask, labels
    results = processor.post_process_object_detection(outputs, threshold=0.7, target_sizes=[(h, w)])

Preprocessing runs on tensors on the images' device (pass `device="cuda"` to decode on the CPU and resize,
normalize and pad on the GPU): each image is resized by torchvision's antialiased resize (the operation
transformers runs, so the pixels are the same), then every image is rescaled, normalized and written once into its
place in the padded batch (transformers makes three more full-size copies: the float conversion, the padding and
the stack).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .annotations import (
    FORMATS,
    check_annotation,
    coco_detection_target,
    coco_panoptic_target,
    normalize_boxes,
    pad_target,
    resize_target,
)
from .postprocess import (
    post_process_instance_segmentation,
    post_process_object_detection,
    post_process_panoptic_segmentation,
    post_process_semantic_segmentation,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RESAMPLE, normalize_and_pad, resize, resized_size, to_uint8_tensor

CONFIG_NAME = "preprocessor_config.json"
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}


class BatchFeature(dict):
    """What preprocessing returns, as transformers' BatchFeature: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> BatchFeature:
        """Every tensor (labels included) moved to `device`."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        return BatchFeature({key: move(value) for key, value in self.items()})


class DetrImageProcessor:
    """Resize, rescale, normalize and pad images (and their annotations) for DETR; post-process its outputs.

    Args (transformers' names and defaults):
        format: "coco_detection" or "coco_panoptic", the annotations' format.
        do_resize, size: resize to size {"shortest_edge", "longest_edge"} (aspect kept), {"height", "width"}, or
            {"max_height", "max_width"}; default {shortest_edge 800, longest_edge 1333}.
        resample: PIL's filter number (2 = bilinear).
        do_rescale, rescale_factor: multiply the pixels (1/255: uint8 to [0, 1]).
        do_normalize, image_mean, image_std: normalize per channel (ImageNet's).
        do_convert_annotations: boxes to normalized cxcywh.
        do_pad, pad_size: pad to the batch's largest image, or to pad_size {"height", "width"}.
    """

    attributes = ("format", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                  "image_mean", "image_std", "do_convert_annotations", "do_pad", "pad_size")  # fmt: skip

    def __init__(
        self,
        format: str = "coco_detection",
        do_resize: bool = True,
        size: dict | None = None,
        resample: int = int(Image.Resampling.BILINEAR),
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        do_convert_annotations: bool | None = None,
        do_pad: bool = True,
        pad_size: dict | None = None,
        **legacy: Any,
    ):
        if "max_size" in legacy:  # transformers v4's separate longest edge
            size = {"shortest_edge": size if isinstance(size, int) else 800, "longest_edge": legacy.pop("max_size")}
        if isinstance(size, int):
            size = {"shortest_edge": size, "longest_edge": 1333}
        do_pad = legacy.pop("pad_and_return_pixel_mask", do_pad)
        legacy.pop("image_processor_type", None)
        legacy.pop("processor_class", None)
        if legacy:
            raise TypeError(f"DetrImageProcessor: unknown arguments {sorted(legacy)}")
        if format not in FORMATS:
            raise ValueError(f"DetrImageProcessor: format must be one of {FORMATS}, got {format!r}")
        if int(resample) not in RESAMPLE:
            raise ValueError(f"DetrImageProcessor: resample must be one of {sorted(RESAMPLE)}, got {resample}")
        self.format = format
        self.do_resize = do_resize
        self.size = dict(size or DEFAULT_SIZE)
        resized_size(100, 200, self.size)  # a size dict of none of the known forms fails here
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_annotations = do_normalize if do_convert_annotations is None else do_convert_annotations
        self.do_pad = do_pad
        self.pad_size = pad_size

    # ------------------------------------------------------------------------------------------ configuration

    def to_dict(self) -> dict:
        return {"image_processor_type": "DetrImageProcessor", **{name: getattr(self, name) for name in self.attributes}}

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write preprocessor_config.json into `directory` (created if needed); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> DetrImageProcessor:
        """Read preprocessor_config.json (ours or transformers', v4 or v5) from a directory or the file itself."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        try:
            with open(file) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"DetrImageProcessor.from_pretrained: cannot read {file}: {error}") from error
        known = set(cls.attributes) | {"max_size", "pad_and_return_pixel_mask", "image_processor_type"}
        return cls(**{**{k: v for k, v in values.items() if k in known}, **overrides})

    def __repr__(self) -> str:
        return f"DetrImageProcessor({json.dumps(self.to_dict())})"

    # -------------------------------------------------------------------------------------------- preprocessing

    def __call__(self, images, annotations=None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, annotations, **kwargs)

    def preprocess(
        self,
        images: Any,
        annotations: dict | list[dict] | None = None,
        return_segmentation_masks: bool | None = None,
        masks_path: str | os.PathLike | None = None,
        return_tensors: str | None = "pt",
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Images (PIL, numpy or tensors; one or a list) and their annotations -> pixel_values [B, 3, H, W],
        pixel_mask [B, H, W] and, with annotations, labels: one dict per image with class_labels, boxes
        (normalized cxcywh relative to the padded image, as transformers), area, iscrowd, orig_size, size,
        image_id, and masks [M, H, W] with return_segmentation_masks (default for coco_panoptic).

        Any constructor argument may be overridden for this call. `device` is where resizing, normalization and
        padding run (default: the images' own; CPU for PIL and numpy images).
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"DetrImageProcessor: return_tensors must be 'pt' (or None), got {return_tensors!r}")
        options = self._options(overrides)
        images = [to_uint8_tensor(image) for image in _as_list(images)]
        if device is not None:
            images = [image.to(device) for image in images]
        targets = self._prepare(images, annotations, options, return_segmentation_masks, masks_path)
        resized = []
        for i, image in enumerate(images):
            height, width = image.shape[-2:]
            if options["do_resize"]:
                new_size = resized_size(height, width, options["size"])
                image = resize(image, *new_size, options["resample"])
                if targets is not None:
                    targets[i] = resize_target(targets[i], (height, width), new_size)
            if targets is not None and options["do_convert_annotations"]:
                targets[i] = normalize_boxes(targets[i], tuple(image.shape[-2:]))
            resized.append(image)
        mean = options["image_mean"] if options["do_normalize"] else None
        std = options["image_std"] if options["do_normalize"] else None
        factor = options["rescale_factor"] if options["do_rescale"] else None
        if options["do_pad"]:
            pad = options["pad_size"]
            pixel_values, pixel_mask = normalize_and_pad(
                resized, mean, std, factor, pad and (pad["height"], pad["width"])
            )
        else:
            if len({tuple(image.shape) for image in resized}) > 1:
                raise ValueError("DetrImageProcessor: images of different sizes need do_pad=True to make a batch")
            pixel_values, pixel_mask = normalize_and_pad(resized, mean, std, factor)
        data = {"pixel_values": pixel_values}
        if options["do_pad"]:
            data["pixel_mask"] = pixel_mask
            if targets is not None:
                padded = tuple(pixel_values.shape[-2:])
                targets = [
                    pad_target(t, tuple(image.shape[-2:]), padded, options["do_convert_annotations"])
                    if tuple(image.shape[-2:]) != padded
                    else t
                    for t, image in zip(targets, resized)
                ]
        if targets is not None:
            data["labels"] = targets
        return BatchFeature(data)

    def _options(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(self.attributes)
        if unknown:
            raise TypeError(f"DetrImageProcessor.preprocess: unknown arguments {sorted(unknown)}")
        options = {name: overrides.get(name, getattr(self, name)) for name in self.attributes}
        if isinstance(options["size"], int):
            options["size"] = {"shortest_edge": options["size"], "longest_edge": 1333}
        return options

    def _prepare(self, images, annotations, options, return_segmentation_masks, masks_path) -> list[dict] | None:
        """The targets of the annotations (None without annotations), before any resize."""
        if annotations is None:
            return None
        annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
        if len(annotations) != len(images):
            raise ValueError(
                f"DetrImageProcessor: {len(images)} image(s) but {len(annotations)} annotation(s); give one per image"
            )
        panoptic = options["format"] == "coco_panoptic"
        with_masks = panoptic if return_segmentation_masks is None else return_segmentation_masks
        targets = []
        for i, (image, annotation) in enumerate(zip(images, annotations)):
            annotation = check_annotation(annotation, options["format"], i)
            height, width = image.shape[-2:]
            if panoptic:
                target = coco_panoptic_target(annotation, masks_path, height, width, with_masks)
            else:
                target = coco_detection_target(annotation, height, width, with_masks)
            targets.append({key: value.to(image.device) for key, value in target.items()})
        return targets

    # --------------------------------------------------------------------------------------- post-processing

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None):
        """Detections per image (scores, labels, xyxy boxes in pixels of target_sizes): see
        detr_fast.processing.postprocess."""
        return post_process_object_detection(outputs.logits, outputs.pred_boxes, threshold, target_sizes)

    def post_process_semantic_segmentation(self, outputs, target_sizes=None, return_segmentation_scores=False):
        """A [H, W] class map per image (and its scores): see detr_fast.processing.postprocess."""
        return post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores)

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes=None,
        return_coco_annotation: bool = False,
    ):
        """A segment map and its segments per image: see detr_fast.processing.postprocess."""
        return post_process_instance_segmentation(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, target_sizes, return_coco_annotation
        )

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse=None,
        target_sizes=None,
    ):
        """A panoptic segment map and its segments per image: see detr_fast.processing.postprocess."""
        return post_process_panoptic_segmentation(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, target_sizes
        )


def _as_list(images: Any) -> list:
    """One image or a batch of them as a list: a list/tuple, a 4-D tensor or array, or a single image."""
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]
