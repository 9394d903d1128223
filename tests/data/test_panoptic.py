"""The COCO panoptic dataset: segments of the PNGs as masks with their labels and boxes (things and stuff, crowd left
out), bad data named or skipped (missing PNG, unknown category, a segment listed twice, a PNG of the wrong size, a
listed segment absent from its PNG), and batches with masks padded as the images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_fast.data.collate import collate
from detr_fast.data.datasets import BadDataError, CocoPanoptic
from detr_fast.data.transforms import train_transforms
from detr_fast.processing.annotations import id_to_rgb

CATEGORIES = [{"id": 1, "name": "cat", "isthing": 1}, {"id": 4, "name": "dog", "isthing": 1},
              {"id": 20, "name": "grass", "isthing": 0}]  # fmt: skip


def segment_maps():
    """Two images' segment maps: grass everywhere, a cat, a dog, a crowd of cats, void pixels."""
    first = np.full((30, 40), 300, np.int64)  # grass, id 300 (its G byte is non-zero)
    first[5:15, 4:20] = 7  # cat
    first[20:28, 30:31] = 8  # a dog one pixel wide
    first[0:3, 35:40] = 9  # a crowd of cats
    first[29, :] = 0  # void
    second = np.full((36, 24), 5, np.int64)  # grass only
    return [(first, [(300, 20, 0), (7, 1, 0), (8, 4, 0), (9, 1, 1)]), (second, [(5, 20, 0)])]


def write_panoptic(root, maps=None, edit=None):
    """Images, PNGs and the panoptic JSON of `maps` under root; `edit(content)` may change the JSON."""
    (root / "images").mkdir(exist_ok=True)
    (root / "png").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id, (segment_map, segments) in enumerate(maps or segment_maps(), start=1):
        height, width = segment_map.shape
        Image.new("RGB", (width, height), (90, 90, 90)).save(root / "images" / f"{image_id}.jpg")
        Image.fromarray(id_to_rgb(segment_map)).save(root / "png" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        infos = [{"id": s, "category_id": c, "iscrowd": crowd, "area": int((segment_map == s).sum())}
                 for s, c, crowd in segments]  # fmt: skip
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": infos})
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    if edit:
        edit(content)
    (root / "panoptic.json").write_text(json.dumps(content))
    return str(root / "images"), str(root / "panoptic.json"), str(root / "png")


def test_segments_become_masks_labels_and_boxes(tmp_path):
    dataset = CocoPanoptic(*write_panoptic(tmp_path))
    assert dataset.label_to_category_id == [1, 4, 20] and dataset.is_thing == [True, True, False]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1
    assert target["class_labels"].tolist() == [2, 0, 1]  # grass, cat, dog; the crowd is no target
    first = segment_maps()[0][0]
    for mask, segment_id in zip(target["masks"], (300, 7, 8), strict=True):
        assert torch.equal(mask, torch.from_numpy(first == segment_id))
    scale = torch.tensor([40, 30, 40, 30])
    extents = torch.tensor([[0, 0, 40, 29], [4, 5, 20, 15], [30, 20, 31, 28]], dtype=torch.float32)  # xyxy
    centre = (extents[:, :2] + extents[:, 2:]) / 2
    expected = torch.cat([centre, extents[:, 2:] - extents[:, :2]], 1) / scale
    assert torch.allclose(target["boxes"], expected)
    assert dataset[1][1]["class_labels"].tolist() == [2]


def drop_png(content):
    content["annotations"][1]["file_name"] = "missing.png"


def unknown_category(content):
    content["annotations"][1]["segments_info"][0]["category_id"] = 99


def duplicate(content):
    content["annotations"][1]["segments_info"].append(dict(content["annotations"][1]["segments_info"][0]))


@pytest.mark.parametrize(
    "edit,message",
    [
        (drop_png, r"image id 2 of .*: panoptic PNG .*missing.png does not exist"),
        (unknown_category, r"segment id 5 \(image id 2 of .*, PNG 2.png\): category_id 99 is not among"),
        (duplicate, r"segment id 5 \(image id 2 of .*, PNG 2.png\) is listed twice"),
    ],
)
def test_bad_annotations_are_named_or_skipped(tmp_path, edit, message):
    files = write_panoptic(tmp_path, edit=edit)
    with pytest.raises(BadDataError, match=message):
        CocoPanoptic(*files)
    with pytest.warns(UserWarning, match="CocoPanoptic: skipped 1 image"):
        dataset = CocoPanoptic(*files, on_bad="skip")
    assert len(dataset) == 1 and dataset.image_ids == [1]


def test_bad_pngs_are_named_when_loaded(tmp_path):
    first, segments = segment_maps()[0]
    files = write_panoptic(tmp_path, maps=[(first, segments + [(11, 4, 0)])])  # segment 11 has no pixels
    with pytest.raises(BadDataError, match=r"segment id 11 of image id 1 is listed but absent from .*1.png"):
        CocoPanoptic(*files)[0]
    assert CocoPanoptic(*files, on_bad="skip")[0] is None
    files = write_panoptic(tmp_path)
    Image.fromarray(id_to_rgb(first[:, :39])).save(tmp_path / "png" / "1.png")
    with pytest.raises(BadDataError, match=r"panoptic PNG .*1.png is 30x39 \(h x w\) but image id 1 is 30x40"):
        CocoPanoptic(*files)[0]


def test_augmented_batches_keep_masks_and_boxes_together(tmp_path):
    transforms = train_transforms([32, 48], 64, crop_size=(16, 30))
    dataset = CocoPanoptic(*write_panoptic(tmp_path), transforms=transforms)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        samples = [dataset[0], dataset[1]]
        batch = collate(samples, size_divisor=16)
        masks = batch["labels"]["masks"]
        assert masks.shape[-2:] == batch["pixel_values"].shape[-2:]
        for i, (image, target) in enumerate(samples):
            assert torch.equal(masks[i, : len(target["boxes"]), : image.shape[1], : image.shape[2]], target["masks"])
            assert target["masks"].flatten(1).any(1).all()  # no target lost its pixels
