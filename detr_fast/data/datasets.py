"""COCO-format datasets: detection (an images folder plus an instances JSON, with instance masks on request) and
panoptic segmentation (CocoPanoptic: images, a panoptic JSON and its PNGs).

The JSON is read with the standard library (training needs no pycocotools); `dataset.coco`, the pycocotools
COCO object that evaluation hands to COCOeval, is built from it on first use.

Every annotation is checked when the dataset is built, so bad data fails before training starts, naming the file
and the annotation id: a category id that is not among the categories, a box with negative width or height, a box
outside its image (beyond a one-pixel tolerance, which COCO's own rounding needs), an image whose file is missing.
An image file that cannot be decoded, or whose size differs from the JSON's, fails when it is loaded. With
`on_bad="skip"` the image concerned is left out instead, and `dataset.skipped` counts the skips by reason.

With `masks=True` (instance segmentation) every training annotation must have a `segmentation`, polygons of at
least 3 points or an RLE of the image's size (else a BadDataError naming the annotation, or a skip), and each item's
target carries "masks" [M, H, W] bool, decoded when the item is loaded (the dataset keeps the polygons and RLEs,
never full-resolution masks).

Category ids map to contiguous labels 0..C-1 in the order of increasing id (`label_to_category_id` inverts it).
Crowd annotations are not training targets (as in DETR) but stay in `dataset.coco` for evaluation, and boxes with
zero width or height are dropped as DETR drops them (counted in `dataset.dropped_empty_boxes`).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..processing.annotations import masks_to_boxes, polygons_or_rle_to_mask, read_segment_map
from .transforms import Compose, ToModelInput

ON_BAD = ("raise", "skip")
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (then clipped), for rounding in COCO files


class BadDataError(ValueError):
    """An annotation file or image that the dataset cannot use; the message names the file and the id, `reason`
    is the short kind of problem that `CocoDetection.skipped` counts."""

    def __init__(self, message: str, reason: str = "bad data"):
        super().__init__(message)
        self.reason = reason


def read_coco_json(annotation_file: str, kind: str, keys: tuple[str, ...]) -> dict:
    """The object of a COCO `kind` ("instances", "panoptic") JSON file, checked to have `keys`; errors name the
    file."""
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"annotation file {annotation_file} does not exist")
    try:
        with open(annotation_file) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadDataError(f"annotation file {annotation_file} is not readable JSON: {error}") from error
    if not isinstance(content, dict) or not set(keys) <= set(content):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        expected = " and ".join(", ".join(f"'{key}'" for key in keys).rsplit(", ", 1))  # 'a', 'b' and 'c'
        raise BadDataError(
            f"annotation file {annotation_file} is not COCO {kind} JSON: expected {expected} keys, got {found}"
        )
    return content


def read_instances(annotation_file: str) -> dict:
    """The content of a COCO instances JSON, checked to have "images" and "categories", with "annotations"
    defaulting to [] and each annotation's "iscrowd" (0) and "area" (its box's) filled in where missing, as
    COCOeval reads both and hand-made files often leave them out. Errors name the file."""
    content = read_coco_json(annotation_file, "instances", ("images", "categories"))
    content.setdefault("annotations", [])
    for kind, key in (
        ("images", "id"),
        ("annotations", "id"),
        ("annotations", "image_id"),
        ("annotations", "category_id"),
    ):
        for entry in content[kind]:
            if not isinstance(entry, dict) or key not in entry:
                raise BadDataError(f"annotation file {annotation_file}: an entry of '{kind}' has no '{key}': {entry}")
    for annotation in content["annotations"]:
        annotation.setdefault("iscrowd", 0)
        bbox = annotation.get("bbox")
        if "area" not in annotation and _is_box(bbox):
            annotation["area"] = bbox[2] * bbox[3]
    return content


def coco_api(instances: dict, annotation_file: str):
    """pycocotools.coco.COCO of the content read_instances returned (for COCOeval)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError(f"evaluating on {annotation_file} needs pycocotools: pip install pycocotools") from error
    coco = COCO()
    coco.dataset = instances
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _is_box(bbox) -> bool:
    return (
        isinstance(bbox, list | tuple)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
    )


def checked_segmentation(segmentation: object, what: str, height: int, width: int) -> list | dict:
    """An annotation's COCO segmentation, polygons ([[x0, y0, x1, y1, ...], ...], each of at least 3 points) or an
    RLE ({"size": [height, width], "counts": ...}); BadDataError naming the annotation otherwise."""
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or list(segmentation.get("size", [])) != [height, width]:
            raise BadDataError(
                f"{what}: its RLE segmentation has size {segmentation.get('size')}, expected [{height}, {width}] "
                "and counts",
                "bad RLE",
            )
        return segmentation
    if not isinstance(segmentation, list) or not segmentation:
        raise BadDataError(f"{what}: no segmentation (polygons or RLE), which masks need", "no segmentation")
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) % 2 or not all(_is_number(v) for v in polygon):
            raise BadDataError(f"{what}: a polygon of its segmentation is not a list of x, y numbers", "bad polygon")
        if len(polygon) < 6:
            raise BadDataError(
                f"{what}: a polygon of its segmentation has {len(polygon) // 2} point(s); at least 3 are needed",
                "bad polygon",
            )
    return segmentation


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class CocoImages(torch.utils.data.Dataset, abc.ABC):
    """What the COCO-format datasets share: the records of the kept images (`images`: id, path, size, ...), the
    skip bookkeeping of on_bad="skip", image loading with its checks, and augmentation seeded by (seed, epoch,
    index)."""

    def __init__(self, image_dir: str, transforms: Compose | None, on_bad: str, seed: int):
        name = type(self).__name__
        if on_bad not in ON_BAD:
            raise ValueError(f"{name}: on_bad must be one of {ON_BAD}, got {on_bad!r}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{name}: image folder {image_dir} does not exist")
        self.image_dir = image_dir
        self.transforms = transforms or Compose([ToModelInput()])
        self.on_bad = on_bad
        self.seed = seed
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self.images: list[dict] = []

    def _keep_checked(self, checks: Iterable[Callable[[], dict]], annotation_file: str) -> None:
        """Fill `images` with the records the checks return, one per image; a check's BadDataError is raised
        under on_bad="raise", else counted in `skipped` (with one warning)."""
        for check in checks:
            try:
                self.images.append(check())
            except BadDataError as error:
                if self.on_bad == "raise":
                    raise
                self.skipped[error.reason] += 1
        if self.skipped:
            warnings.warn(
                f"{type(self).__name__}: skipped {sum(self.skipped.values())} image(s) of {annotation_file}: "
                + ", ".join(f"{count} with {reason}" for reason, count in sorted(self.skipped.items())),
                stacklevel=3,
            )
        self.image_ids = [image["id"] for image in self.images]

    def _image_entry(self, info: dict) -> tuple[str, str]:
        """(where: the image's name in messages, path: its file) of a JSON image entry; BadDataError when the
        entry lacks file_name, width or height, or the file does not exist."""
        where = f"image id {info['id']} of {self.annotation_file}"
        if "file_name" not in info or "width" not in info or "height" not in info:
            raise BadDataError(f"{where} lacks file_name, width or height: {info}", "incomplete image entry")
        path = os.path.join(self.image_dir, info["file_name"])
        if not os.path.isfile(path):
            raise BadDataError(f"{where}: image file {path} does not exist", "missing image file")
        return where, path

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations of item i in epoch e come from the seed (dataset seed, e, i)."""
        self.epoch = epoch

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item `index`; BadDataError naming the file if it cannot be decoded or its size
        differs from the annotation file's."""
        record = self.images[index]
        try:
            with Image.open(record["path"]) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise BadDataError(
                f"image file {record['path']} (image id {record['id']}) cannot be read: {error}", "unreadable image"
            ) from error
        if (image.height, image.width) != record["size"]:
            raise BadDataError(
                f"image file {record['path']} (image id {record['id']}) is {image.height}x{image.width} (h x w) but "
                f"{self.annotation_file} says {record['size'][0]}x{record['size'][1]}",
                "image size mismatch",
            )
        return image

    @abc.abstractmethod
    def target_of(self, index: int) -> dict:
        """The untransformed target of item `index` (boxes xyxy in pixels); BadDataError if it cannot be read."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        try:
            image = self.load_image(index)
            target = self.target_of(index)
        except BadDataError:
            if self.on_bad == "raise":
                raise
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transforms(image, target, rng)


class CocoDetection(CocoImages):
    """Images and boxes of a COCO-format split.

    Item i is (image [3, H, W] normalized, target) with target {"image_id": int, "class_labels" [M] int64,
    "boxes" [M, 4] normalized cxcywh, "orig_size": (h, w) of the file, "size": (H, W) after the transforms, and
    with masks=True "masks" [M, H, W] bool}, or None for an unreadable image when on_bad="skip" (the collate drops
    it and counts it).
    """

    def __init__(
        self,
        image_dir: str,
        annotation_file: str,
        transforms: Compose | None = None,
        on_bad: str = "raise",
        seed: int = 0,
        masks: bool = False,
    ):
        super().__init__(image_dir, transforms, on_bad, seed)
        self.annotation_file = annotation_file
        self.masks = masks
        self.instances = read_instances(annotation_file)
        categories = {category["id"]: category for category in self.instances["categories"]}
        self.label_to_category_id = sorted(categories)
        self.category_names = [categories[c].get("name", str(c)) for c in self.label_to_category_id]
        entries = {image["id"]: image for image in self.instances["images"]}
        annotations: dict[int, list[dict]] = {}
        for annotation in self.instances["annotations"]:
            annotations.setdefault(annotation.get("image_id"), []).append(annotation)
        category_to_label = {c: i for i, c in enumerate(self.label_to_category_id)}
        self.dropped_empty_boxes = 0
        # per kept image: id, path, size, boxes [M, 4] xyxy, labels [M], segmentations
        self._keep_checked(
            (
                functools.partial(
                    self._check_image, entries[image_id], annotations.get(image_id, []), category_to_label
                )
                for image_id in sorted(entries)
            ),
            annotation_file,
        )

    @functools.cached_property
    def coco(self):
        """The pycocotools COCO ground truth of the split, crowd annotations included (for evaluation)."""
        return coco_api(self.instances, self.annotation_file)

    def _check_image(self, info: dict, annotations: list[dict], category_to_label: dict[int, int]) -> dict:
        """The training record of one image (its JSON entry and annotations), or BadDataError(message, reason)."""
        image_id = info["id"]
        where, path = self._image_entry(info)
        width, height = info["width"], info["height"]
        boxes, labels, segmentations = [], [], []
        for annotation in annotations:
            what = f"annotation id {annotation.get('id')} ({where}, file {info['file_name']})"
            category = annotation.get("category_id")
            if category not in category_to_label:
                raise BadDataError(
                    f"{what}: category_id {category} is not among the categories {self.label_to_category_id}",
                    "unknown category",
                )
            bbox = annotation.get("bbox")
            if not _is_box(bbox):
                raise BadDataError(f"{what}: bbox {bbox} is not four finite numbers [x, y, w, h]", "malformed box")
            x, y, w, h = bbox
            if w < 0 or h < 0:
                raise BadDataError(f"{what}: bbox {bbox} has a negative size (w={w}, h={h})", "negative box size")
            if (
                x < -BOX_TOLERANCE
                or y < -BOX_TOLERANCE
                or x + w > width + BOX_TOLERANCE
                or y + h > height + BOX_TOLERANCE
            ):
                raise BadDataError(
                    f"{what}: bbox {bbox} [x, y, w, h] reaches outside the {width}x{height} image",
                    "box outside the image",
                )
            if annotation.get("iscrowd", 0):
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, width), min(y + h, height)
            if x1 <= x0 or y1 <= y0:
                self.dropped_empty_boxes += 1
                continue
            if self.masks:
                segmentations.append(checked_segmentation(annotation.get("segmentation"), what, height, width))
            boxes.append([x0, y0, x1, y1])
            labels.append(category_to_label[category])
        return {
            "id": image_id,
            "path": path,
            "size": (height, width),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "class_labels": torch.tensor(labels, dtype=torch.int64),
            "segmentations": segmentations,
        }

    def target_of(self, index: int) -> dict:
        record = self.images[index]
        target = {
            "image_id": record["id"],
            "boxes": record["boxes"].clone(),
            "class_labels": record["class_labels"],
            "orig_size": record["size"],
        }
        if self.masks:
            height, width = record["size"]
            decoded = [polygons_or_rle_to_mask(segmentation, height, width) for segmentation in record["segmentations"]]
            target["masks"] = torch.stack(decoded) if decoded else torch.zeros((0, height, width), dtype=torch.bool)
        return target


class CocoPanoptic(CocoImages):
    """Images and segments of a COCO panoptic split: an images folder, a panoptic JSON ("images", "annotations"
    with one {"image_id", "file_name", "segments_info"} per image, "categories" with "isthing") and the folder of
    its PNGs (segment id = R + 256 G + 256^2 B, 0 = void).

    Item i is (image [3, H, W] normalized, target) with target {"image_id", "class_labels" [M] int64, "boxes"
    [M, 4] normalized cxcywh (each segment's pixel extent: transformers' and DETR's boxes from masks end one pixel
    earlier, which leaves a one-pixel-wide segment without a box), "masks" [M, H, W]
    bool, "orig_size", "size"}; crowd segments are no training targets but stay in the JSON for PQ. Labels are
    0..C-1 over all categories, things and stuff, in the order of increasing id (`label_to_category_id`,
    `is_thing`).

    Checked when the dataset is built (a BadDataError naming the file and the id, or a skip under on_bad="skip"):
    an image without its annotation, a PNG that does not exist, a segment of an unknown category or listed twice.
    Checked when an item loads: the PNG's size against the image's, and every listed segment present in the PNG.
    """

    def __init__(
        self,
        image_dir: str,
        annotation_file: str,
        png_dir: str,
        transforms: Compose | None = None,
        on_bad: str = "raise",
        seed: int = 0,
    ):
        super().__init__(image_dir, transforms, on_bad, seed)
        if not os.path.isdir(png_dir):
            raise FileNotFoundError(f"CocoPanoptic: PNG folder {png_dir} does not exist")
        self.annotation_file = annotation_file
        self.png_dir = png_dir
        self.panoptic = read_panoptic(annotation_file)
        categories = {category["id"]: category for category in self.panoptic["categories"]}
        self.label_to_category_id = sorted(categories)
        self.category_names = [categories[c].get("name", str(c)) for c in self.label_to_category_id]
        self.is_thing = [bool(categories[c].get("isthing", 1)) for c in self.label_to_category_id]
        category_to_label = {c: i for i, c in enumerate(self.label_to_category_id)}
        annotations = {annotation["image_id"]: annotation for annotation in self.panoptic["annotations"]}
        entries = {image["id"]: image for image in self.panoptic["images"]}
        self._keep_checked(
            (
                functools.partial(self._check_image, entries[image_id], annotations.get(image_id), category_to_label)
                for image_id in sorted(entries)
            ),
            annotation_file,
        )

    @property
    def category_is_thing(self) -> dict[int, bool]:
        """Category id -> True for a thing, False for stuff (the JSON's "isthing", 1 when absent)."""
        return dict(zip(self.label_to_category_id, self.is_thing))

    def _check_image(self, info: dict, annotation: dict | None, category_to_label: dict[int, int]) -> dict:
        """The record of one image: its JSON entry, its PNG's path and its segments, or BadDataError."""
        image_id = info["id"]
        where, path = self._image_entry(info)
        if annotation is None:
            raise BadDataError(f"{where} has no entry in 'annotations'", "no panoptic annotation")
        png = os.path.join(self.png_dir, annotation["file_name"])
        if not os.path.isfile(png):
            raise BadDataError(f"{where}: panoptic PNG {png} does not exist", "missing PNG")
        seen, segments = set(), []
        for segment in annotation["segments_info"]:
            segment_id, category = segment.get("id"), segment.get("category_id")
            what = f"segment id {segment_id} ({where}, PNG {annotation['file_name']})"
            if category not in category_to_label:
                raise BadDataError(
                    f"{what}: category_id {category} is not among the categories {self.label_to_category_id}",
                    "unknown category",
                )
            if segment_id in seen:
                raise BadDataError(f"{what} is listed twice", "duplicate segment")
            seen.add(segment_id)
            if not segment.get("iscrowd", 0):
                segments.append((segment_id, category_to_label[category]))
        return {"id": image_id, "path": path, "size": (info["height"], info["width"]), "png": png,
                "segments": segments}  # fmt: skip

    def target_of(self, index: int) -> dict:
        record = self.images[index]
        try:
            ids = torch.from_numpy(read_segment_map(record["png"]))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise BadDataError(f"panoptic PNG {record['png']} cannot be read: {error}", "unreadable PNG") from error
        if tuple(ids.shape) != record["size"]:
            raise BadDataError(
                f"panoptic PNG {record['png']} is {ids.shape[0]}x{ids.shape[1]} (h x w) but image id {record['id']} "
                f"is {record['size'][0]}x{record['size'][1]}",
                "PNG size mismatch",
            )
        segment_ids = torch.tensor([segment_id for segment_id, _ in record["segments"]], dtype=ids.dtype)
        masks = ids[None] == segment_ids[:, None, None]  # [M, H, W]
        empty = ~masks.flatten(1).any(1)
        if empty.any():
            missing = int(segment_ids[empty.nonzero()[0, 0]])
            raise BadDataError(
                f"segment id {missing} of image id {record['id']} is listed but absent from {record['png']}",
                "segment absent from its PNG",
            )
        # the segments' pixel extents: the last row and column included, so a segment one pixel wide has a box
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # [M, 4] xyxy
        return {
            "image_id": record["id"],
            "boxes": boxes,
            "class_labels": torch.tensor([label for _, label in record["segments"]], dtype=torch.int64),
            "masks": masks,
            "orig_size": record["size"],
        }


def read_panoptic(annotation_file: str) -> dict:
    """The content of a COCO panoptic JSON, checked to have "images", "annotations" and "categories", each
    annotation an "image_id", a "file_name" and a "segments_info" list. Errors name the file."""
    content = read_coco_json(annotation_file, "panoptic", ("images", "annotations", "categories"))
    for annotation in content["annotations"]:
        if not isinstance(annotation, dict) or not {"image_id", "file_name", "segments_info"} <= set(annotation):
            raise BadDataError(
                f"annotation file {annotation_file}: an annotation lacks image_id, file_name or segments_info: "
                f"{str(annotation)[:200]}"
            )
    return content
