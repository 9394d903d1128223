"""COCO-format datasets: targets as the annotations say, contiguous labels, bad data named (file, annotation id) or
skipped and counted, augmentation a function of (seed, epoch, index), the same batches with or without workers."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detr_fast.data.collate import collate
from detr_fast.data.datasets import BadDataError, CocoDetection
from detr_fast.data.transforms import train_transforms

from ..helpers import write_split

GOOD_IMAGES = [("a.png", 40, 30), ("b.png", 20, 50)]
GOOD_ANNOTATIONS = [
    {"image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 12]},
    {"image_id": 1, "category_id": 11, "bbox": [0, 0, 40, 30]},
    {"image_id": 2, "category_id": 3, "bbox": [2, 10, 10, 30]},
]


def test_targets_follow_the_annotations(tmp_path):
    dataset = CocoDetection(*write_split(tmp_path, GOOD_IMAGES, GOOD_ANNOTATIONS))
    assert len(dataset) == 2 and dataset.label_to_category_id == [3, 7, 11]
    assert dataset.category_names == ["cat", "dog", "emu"]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and target["size"] == (30, 40) and target["orig_size"] == (30, 40)
    assert target["image_id"] == 1 and target["class_labels"].tolist() == [1, 2]
    expected = torch.tensor([[14 / 40, 9 / 30, 20 / 40, 12 / 30], [0.5, 0.5, 1.0, 1.0]])
    assert torch.allclose(target["boxes"], expected)
    assert dataset[1][1]["class_labels"].tolist() == [0]


def test_crowd_and_empty_boxes_are_not_targets(tmp_path):
    annotations = [
        *GOOD_ANNOTATIONS,
        {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 5]},
    ]
    dataset = CocoDetection(*write_split(tmp_path, GOOD_IMAGES, annotations))
    assert dataset[1][1]["class_labels"].tolist() == [0]
    assert dataset.dropped_empty_boxes == 1
    # the ground truth for evaluation keeps them
    assert len([a for a in dataset.instances["annotations"] if a["image_id"] == 2]) == 3
    pytest.importorskip("pycocotools")
    assert len(dataset.coco.imgToAnns[2]) == 3


@pytest.mark.parametrize(
    "annotation,message",
    [
        ({"image_id": 2, "category_id": 5, "bbox": [1, 1, 5, 5]}, r"annotation id 103 .*category_id 5 is not among"),
        ({"image_id": 2, "category_id": 3, "bbox": [1, 1, -5, 5]}, r"annotation id 103 .*negative size"),
        ({"image_id": 2, "category_id": 3, "bbox": [10, 30, 12, 5]}, r"annotation id 103 .*outside the 20x50 image"),
        ({"image_id": 2, "category_id": 3, "bbox": [1, 1, 5]}, r"annotation id 103 .*not four finite numbers"),
    ],
)
def test_bad_annotations_are_named_or_skipped(tmp_path, annotation, message):
    image_dir, path = write_split(tmp_path, GOOD_IMAGES, [*GOOD_ANNOTATIONS, annotation])
    with pytest.raises(BadDataError, match=message) as error:
        CocoDetection(image_dir, path)
    assert "b.png" in str(error.value) and path in str(error.value)
    with pytest.warns(UserWarning, match="skipped 1 image"):
        dataset = CocoDetection(image_dir, path, on_bad="skip")
    assert dataset.image_ids == [1] and sum(dataset.skipped.values()) == 1


def test_a_box_a_rounding_error_past_the_border_is_clipped(tmp_path):
    annotations = [{"image_id": 1, "category_id": 3, "bbox": [-0.4, 20, 40.5, 10.3]}]
    dataset = CocoDetection(*write_split(tmp_path, GOOD_IMAGES, annotations))
    assert torch.allclose(dataset.images[0]["boxes"], torch.tensor([[0.0, 20.0, 40.0, 30.0]]))


def test_missing_image_file_is_named_or_skipped(tmp_path):
    image_dir, path = write_split(tmp_path, GOOD_IMAGES, GOOD_ANNOTATIONS)
    os.remove(os.path.join(image_dir, "b.png"))
    with pytest.raises(BadDataError, match=r"image id 2 .*b\.png does not exist"):
        CocoDetection(image_dir, path)
    with pytest.warns(UserWarning, match="1 with missing image file"):
        assert CocoDetection(image_dir, path, on_bad="skip").image_ids == [1]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong size"])
def test_unreadable_image_is_named_or_skipped_at_load(tmp_path, damage):
    image_dir, path = write_split(tmp_path, GOOD_IMAGES, GOOD_ANNOTATIONS)
    file = os.path.join(image_dir, "a.png")
    if damage == "garbage":
        with open(file, "wb") as f:
            f.write(b"not a png at all")
    elif damage == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(file)
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
    else:
        Image.new("RGB", (41, 30)).save(file)
    dataset = CocoDetection(image_dir, path)  # files are decoded only when loaded
    with pytest.raises(BadDataError, match=r"a\.png \(image id 1\)"):
        dataset[0]
    skipping = CocoDetection(image_dir, path, on_bad="skip")
    assert skipping[0] is None
    batch = collate([skipping[0], skipping[1]])
    assert batch["num_skipped"] == 1 and batch["image_ids"].tolist() == [2] and batch["pixel_values"].shape[0] == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"annotations": []}), "expected 'images' and 'categories'"),
        (json.dumps({"images": [{"file_name": "a.png"}], "categories": []}), "an entry of 'images' has no 'id'"),
        (
            json.dumps({"images": [], "categories": [], "annotations": [{"id": 4}]}),
            "an entry of 'annotations' has no 'image_id'",
        ),
        (
            json.dumps({"images": [], "categories": [], "annotations": [{"image_id": 1, "category_id": 3}]}),
            "an entry of 'annotations' has no 'id'",
        ),
    ],
)
def test_bad_annotation_file_is_named(tmp_path, content, message):
    image_dir, path = write_split(tmp_path, GOOD_IMAGES, GOOD_ANNOTATIONS)
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(BadDataError, match=message) as error:
        CocoDetection(image_dir, path)
    assert path in str(error.value)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        CocoDetection(image_dir, os.path.join(tmp_path, "nothing.json"))
    with pytest.raises(ValueError, match="on_bad must be one of"):
        CocoDetection(image_dir, path, on_bad="ignore")


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    image_dir, path = write_split(
        tmp_path,
        [(f"{i}.png", 40 + i, 30) for i in range(6)],
        [{"image_id": i + 1, "category_id": 3, "bbox": [2, 2, 10, 10]} for i in range(6)],
    )
    transforms = train_transforms([16, 20, 24, 28, 32], 64)

    def sizes(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset[i][0].shape for i in range(len(dataset))]

    first = CocoDetection(image_dir, path, transforms, seed=1)
    second = CocoDetection(image_dir, path, transforms, seed=1)
    assert sizes(first, 0) == sizes(second, 0) and sizes(first, 3) == sizes(second, 3)
    assert sizes(first, 0) != sizes(first, 1)
    assert sizes(first, 0) != sizes(CocoDetection(image_dir, path, transforms, seed=2), 0)


def test_workers_give_the_same_batches(tmp_path):
    image_dir, path = write_split(
        tmp_path,
        [(f"{i}.png", 30 + 3 * i, 30) for i in range(6)],
        [{"image_id": i + 1, "category_id": 7, "bbox": [i, 2, 10, 12]} for i in range(6)],
    )
    dataset = CocoDetection(image_dir, path, train_transforms([24, 32], 48), seed=4)

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=workers)
        return list(loader)

    for serial, parallel in zip(batches(0), batches(2)):
        assert torch.equal(serial["pixel_values"], parallel["pixel_values"])
        assert torch.equal(serial["labels"]["boxes"], parallel["labels"]["boxes"])
