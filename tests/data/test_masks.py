"""Instance masks in the data pipeline: decoded from COCO polygons and RLE when an item loads, bad segmentations
named or skipped, masks following every transform (flip, multi-scale resize, random crop) and padded by the collate
to the padded images' size."""

import numpy as np
import pytest
import torch

from detr_fast.data.collate import collate
from detr_fast.data.datasets import BadDataError, CocoDetection
from detr_fast.data.transforms import crop, hflip, resize, train_transforms
from detr_fast.processing.annotations import masks_to_boxes

from ..helpers import write_split

pytest.importorskip("pycocotools", reason="masks are decoded with pycocotools")
from pycocotools import mask as coco_mask  # noqa: E402

IMAGES = [("a.png", 40, 30), ("b.png", 24, 36)]


def rectangle_rle(height, width, top, left, bottom, right):
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 1
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


ANNOTATIONS = [
    # a polygon: the rectangle x 4..24, y 3..15
    {"image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 12], "segmentation": [[4, 3, 24, 3, 24, 15, 4, 15]]},
    # a compressed RLE: rows 10..20, columns 30..38
    {"image_id": 1, "category_id": 3, "bbox": [30, 10, 8, 10], "segmentation": rectangle_rle(30, 40, 10, 30, 20, 38)},
    {
        "image_id": 1,
        "category_id": 3,
        "bbox": [0, 0, 5, 5],
        "iscrowd": 1,
        "segmentation": rectangle_rle(30, 40, 0, 0, 5, 5),
    },
    {"image_id": 2, "category_id": 11, "bbox": [2, 2, 10, 20], "segmentation": [[2, 2, 12, 2, 12, 22, 2, 22]]},
]


def test_masks_follow_the_annotations(tmp_path):
    dataset = CocoDetection(*write_split(tmp_path, IMAGES, ANNOTATIONS), masks=True)
    assert all(isinstance(s, list | dict) for record in dataset.images for s in record["segmentations"])
    _, target = dataset[0]
    masks = target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 30, 40)  # the crowd annotation is no target
    rle = np.zeros((30, 40), bool)
    rle[10:20, 30:38] = True
    assert torch.equal(masks[1], torch.from_numpy(rle))
    ys, xs = masks[0].nonzero(as_tuple=True)  # the rectangle polygon covers pixels 3..14 x 4..23
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (3, 14, 4, 23) and len(ys) == 12 * 20
    _, target = dataset[1]
    assert target["masks"].shape == (1, 36, 24)
    without = CocoDetection(*write_split(tmp_path, IMAGES, ANNOTATIONS))
    assert "masks" not in without[0][1]


@pytest.mark.parametrize(
    "segmentation,message",
    [
        ([[4, 3, 24, 3]], "a polygon of its segmentation has 2 point"),
        ([[4, 3, 24]], "a polygon of its segmentation is not a list of x, y numbers"),
        (None, "no segmentation"),
        ({"size": [30, 41], "counts": "abc"}, r"its RLE segmentation has size \[30, 41\], expected \[30, 40\]"),
    ],
)
def test_bad_segmentations_are_named_or_skipped(tmp_path, segmentation, message):
    bad = {"image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 12], "segmentation": segmentation}
    split = write_split(tmp_path, IMAGES, [bad, ANNOTATIONS[3]])
    with pytest.raises(BadDataError, match=rf"annotation id 100 \(image id 1 of .*, file a.png\): {message}"):
        CocoDetection(*split, masks=True)
    with pytest.warns(UserWarning, match="skipped 1 image"):
        dataset = CocoDetection(*split, masks=True, on_bad="skip")
    assert len(dataset) == 1 and sum(dataset.skipped.values()) == 1
    CocoDetection(*split)  # a detection dataset does not read segmentations


def boxes_of(target):
    return masks_to_boxes(target["masks"])  # [M, 4] xyxy of the pixels' extent


def test_masks_follow_flip_resize_and_crop():
    masks = torch.zeros(2, 30, 40, dtype=torch.bool)
    masks[0, 3:15, 4:24] = True
    masks[1, 10:20, 30:38] = True
    target = {"boxes": torch.tensor([[4.0, 3, 24, 15], [30, 10, 38, 20]]), "class_labels": torch.tensor([1, 0]),
              "masks": masks}  # fmt: skip
    image = torch.zeros(3, 30, 40, dtype=torch.uint8)
    _, flipped = hflip(image, target)
    assert torch.equal(flipped["masks"], masks.flip(-1))
    assert torch.allclose(boxes_of(flipped) + torch.tensor([0, 0, 1, 1]), flipped["boxes"])
    resized_image, resized = resize(image, target, 60)
    assert resized["masks"].shape == (2, 60, 80) and resized_image.shape[-2:] == (60, 80)
    assert torch.allclose(boxes_of(resized) + torch.tensor([0, 0, 1, 1]), resized["boxes"], atol=1)
    _, cropped = crop(image, target, top=5, left=20, height=20, width=20)
    assert cropped["masks"].shape == (2, 20, 20) and cropped["class_labels"].tolist() == [1, 0]
    assert torch.equal(cropped["masks"][0], masks[0, 5:25, 20:40])
    _, cropped = crop(image, target, top=0, left=0, height=10, width=20)  # the second object is cut away
    assert cropped["masks"].shape == (1, 10, 20) and cropped["class_labels"].tolist() == [1]


def test_random_augmentation_and_collate_keep_masks_on_their_boxes(tmp_path):
    transforms = train_transforms([32, 48], 64, crop_resize=None, crop_size=(16, 30))
    dataset = CocoDetection(*write_split(tmp_path, IMAGES, ANNOTATIONS), transforms=transforms, masks=True)
    for epoch in range(6):
        dataset.set_epoch(epoch)
        samples = [dataset[0], dataset[1]]
        for image, target in samples:
            assert target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height])
            box = torch.cat([target["boxes"][:, :2] - target["boxes"][:, 2:] / 2,
                             target["boxes"][:, :2] + target["boxes"][:, 2:] / 2], -1) * scale  # fmt: skip
            extent = boxes_of(target) + torch.tensor([0, 0, 1, 1])
            assert torch.allclose(extent, box, atol=2), (epoch, extent, box)  # nearest resizing: a pixel or two
        batch = collate(samples, size_divisor=32)
        masks = batch["labels"]["masks"]
        assert masks.shape[-2:] == batch["pixel_values"].shape[-2:] and masks.shape[-1] % 32 == 0
        for i, (image, target) in enumerate(samples):
            count, (height, width) = len(target["boxes"]), image.shape[-2:]
            assert torch.equal(masks[i, :count, :height, :width], target["masks"])
            assert not masks[i, count:].any() and not masks[i, :, height:].any() and not masks[i, :, :, width:].any()
