"""Annotations for the image processor: COCO detection (boxes, crowd, polygon or RLE masks) and COCO panoptic (PNG
segment maps) into DETR's targets, and their geometry through resize, normalization and padding, with
transformers' DetrImageProcessor's results; unlike it, crowd objects with masks and images without annotations
work.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..reference.box_ops import corners_to_center

FORMATS = ("coco_detection", "coco_panoptic")


def check_annotation(annotation: object, format: str, index: int) -> dict:
    """The annotation of image `index`, checked to have what `format` needs; ValueError naming what lacks."""
    needed = ("image_id", "annotations") if format == "coco_detection" else ("file_name", "segments_info")
    if not isinstance(annotation, dict) or any(key not in annotation for key in needed):
        got = sorted(annotation) if isinstance(annotation, dict) else type(annotation).__name__
        raise ValueError(f"DetrImageProcessor: annotations[{index}] for format {format!r} needs {needed}, got {got}")
    if format == "coco_panoptic" and "image_id" not in annotation and "id" not in annotation:
        raise ValueError(f"DetrImageProcessor: annotations[{index}] (coco_panoptic) has no image_id")
    return annotation


def polygons_or_rle_to_mask(segmentation: list | dict, height: int, width: int) -> torch.Tensor:
    """A COCO segmentation (a list of polygons, or RLE with list or string counts) -> [height, width] bool."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        rles = segmentation  # compressed RLE decodes as it is
    else:
        rles = coco_mask.frPyObjects(segmentation, height, width)
    decoded = coco_mask.decode(rles)  # [H, W] or [H, W, parts]
    if decoded.ndim == 3:
        decoded = decoded.any(-1)
    return torch.from_numpy(np.ascontiguousarray(decoded)).bool()


def coco_detection_target(annotation: dict, height: int, width: int, with_masks: bool) -> dict:
    """transformers' coco_detection preparation: crowd objects left out, xywh boxes to xyxy clipped to the image,
    empty boxes dropped; class_labels are the category ids; masks [M, H, W] bool when asked (polygons or RLE)."""
    objects = [obj for obj in annotation["annotations"] if not obj.get("iscrowd", 0)]
    boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    target = {
        "image_id": torch.tensor([annotation["image_id"]], dtype=torch.int64),
        "class_labels": torch.tensor([obj["category_id"] for obj in objects], dtype=torch.int64)[keep],
        "boxes": boxes[keep],
        "area": torch.tensor([obj["area"] for obj in objects], dtype=torch.float32)[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }
    if with_masks:
        masks = [polygons_or_rle_to_mask(obj["segmentation"], height, width) for obj in objects]
        stacked = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool)
        target["masks"] = stacked[keep]
    return target


def rgb_to_id(color: np.ndarray) -> np.ndarray:
    """panopticapi's segment id of a [H, W, 3] RGB array: R + 256 G + 256^2 B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of rgb_to_id: segment ids [H, W] as the [H, W, 3] uint8 colours of a COCO panoptic PNG."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)


def read_segment_map(path: str) -> np.ndarray:
    """A COCO panoptic PNG as [H, W] int64 segment ids (0 = void)."""
    with Image.open(path) as png:
        return rgb_to_id(np.asarray(png.convert("RGB")))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """masks [M, H, W] bool -> [M, 4] xyxy from the first to the last column and row of each mask (inclusive
    indices, as transformers computes them); zeros for no masks."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    rows, columns = masks.any(2), masks.any(1)  # [M, H], [M, W]
    height, width = masks.shape[1:]
    y = torch.arange(height, dtype=torch.float32)
    x = torch.arange(width, dtype=torch.float32)
    big = torch.tensor(1e8)
    x0 = torch.where(columns, x, big).min(1).values
    y0 = torch.where(rows, y, big).min(1).values
    x1 = (columns * x).max(1).values
    y1 = (rows * y).max(1).values
    return torch.stack([x0, y0, x1, y1], 1)


def coco_panoptic_target(annotation: dict, masks_path: str, height: int, width: int, with_masks: bool) -> dict:
    """transformers' coco_panoptic preparation: the segments of the PNG `masks_path/file_name` as masks, their
    boxes, category ids, crowd flags and areas. ValueError naming the file when it is missing or of another size."""
    image_id = annotation.get("image_id", annotation.get("id"))
    target = {
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }
    segments = annotation["segments_info"]
    if masks_path is None:
        raise ValueError("DetrImageProcessor: format 'coco_panoptic' needs masks_path (the folder of the PNGs)")
    path = os.path.join(masks_path, annotation["file_name"])
    if not os.path.isfile(path):
        raise ValueError(f"DetrImageProcessor: panoptic PNG {path} (image id {image_id}) does not exist")
    ids = read_segment_map(path)
    if ids.shape != (height, width):
        raise ValueError(
            f"DetrImageProcessor: panoptic PNG {path} is {ids.shape[0]}x{ids.shape[1]} but its image is "
            f"{height}x{width}"
        )
    segment_ids = torch.tensor([segment["id"] for segment in segments], dtype=torch.int64)
    masks = torch.from_numpy(ids)[None] == segment_ids[:, None, None]  # [M, H, W]
    if with_masks:
        target["masks"] = masks
    target["boxes"] = masks_to_boxes(masks)
    target["class_labels"] = torch.tensor([s["category_id"] for s in segments], dtype=torch.int64)
    target["iscrowd"] = torch.tensor([s.get("iscrowd", 0) for s in segments], dtype=torch.int64)
    target["area"] = torch.tensor([s["area"] for s in segments], dtype=torch.float32)
    return target


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[M, h, w] bool masks resized to [M, height, width] by nearest-exact neighbour (transformers' rule: the source
    pixel under each output pixel's centre, aligned as the image's resize is; DETR's "nearest" reads half a pixel
    up and left)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    resized = F.interpolate(masks[:, None].to(torch.uint8), size=(height, width), mode="nearest-exact")
    return resized[:, 0].bool()  # [M, height, width]


def resize_target(target: dict, orig_size: tuple[int, int], size: tuple[int, int]) -> dict:
    """Boxes and areas scaled from `orig_size` to `size`, masks resized (nearest-exact, as transformers); "size"."""
    ratio_height, ratio_width = size[0] / orig_size[0], size[1] / orig_size[1]
    resized = {**target, "size": torch.tensor(size, dtype=torch.int64)}
    if "boxes" in target:
        scale = torch.tensor([ratio_width, ratio_height, ratio_width, ratio_height], dtype=torch.float32)
        resized["boxes"] = target["boxes"] * scale
    if "area" in target:
        resized["area"] = target["area"] * (ratio_width * ratio_height)
    if "masks" in target:
        resized["masks"] = resize_masks(target["masks"], *size)
    return resized


def normalize_boxes(target: dict, size: tuple[int, int]) -> dict:
    """xyxy pixel boxes -> cxcywh divided by the image `size` (height, width)."""
    if "boxes" not in target:
        return target
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {**target, "boxes": corners_to_center(target["boxes"]) / scale}


def pad_target(target: dict, size: tuple[int, int], padded: tuple[int, int], normalized_boxes: bool) -> dict:
    """The target of an image padded from `size` to `padded` at the bottom and right: masks padded with zeros,
    normalized boxes rescaled to the padded image (transformers' convention), "size" the padded size."""
    result = {**target, "size": torch.tensor(padded, dtype=torch.int64)}
    if "masks" in target:
        masks = target["masks"]
        result["masks"] = F.pad(masks, (0, padded[1] - size[1], 0, padded[0] - size[0]))
    if "boxes" in target and normalized_boxes:
        ratio = torch.tensor([size[1] / padded[1], size[0] / padded[0]] * 2, dtype=torch.float32)
        result["boxes"] = target["boxes"] * ratio
    return result
