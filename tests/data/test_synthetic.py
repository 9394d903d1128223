"""The built-in synthetic shapes: deterministic, valid COCO, objects where the annotations say; the panoptic variant
(stuff bands under the shapes): deterministic, every pixel segmented, a COCO panoptic split that loads."""

import json
import os

import numpy as np
import pytest

from detr_fast.data.datasets import CocoPanoptic
from detr_fast.data.synthetic import (
    CLASSES,
    STUFF,
    SyntheticSpec,
    _covered_fraction,
    render,
    render_panoptic,
    write_coco,
    write_coco_panoptic,
)
from detr_fast.panoptic_quality import panoptic_quality_of_files


def test_render_is_a_function_of_index_and_seed():
    image, objects = render(3, seed=7)
    again, objects_again = render(3, seed=7)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and objects == objects_again
    assert render(3, seed=8)[1] != objects
    assert render(4, seed=7)[1] != objects


@pytest.mark.parametrize("index", range(12))
def test_objects_lie_in_the_image_and_respect_the_spec(index):
    spec = SyntheticSpec()
    image, objects = render(index, seed=1, spec=spec)
    assert spec.min_size <= image.width <= spec.max_size and spec.min_size <= image.height <= spec.max_size
    assert 1 <= len(objects) <= spec.max_objects
    corners = []
    for obj in objects:
        x, y, w, h = obj["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image.width and y + h <= image.height
        assert w >= spec.min_object_fraction * image.width - 1 and h >= spec.min_object_fraction * image.height - 1
        assert 0 <= obj["category_id"] < len(CLASSES)
        corners.append((x, y, x + w, y + h))
    for i, earlier in enumerate(corners):  # later shapes cover at most max_covered of an earlier one
        for later in corners[i + 1 :]:
            assert _covered_fraction(earlier, later) <= spec.max_covered + 1e-9


def test_the_last_shape_is_drawn_inside_its_box():
    # The last shape is never covered, so its colour fills part of its box and its centre row/column.
    image, objects = render(5, seed=2)
    pixels = np.asarray(image).astype(int)
    x, y, w, h = objects[-1]["bbox"]
    centre = pixels[y + h // 2, x + w // 2]
    inside = pixels[y : y + h, x : x + w]
    assert (np.abs(inside - centre).sum(-1) == 0).mean() > 0.2  # a flat colour covers a good part of the box


def test_write_coco_writes_a_loadable_split_once(tmp_path):
    from detr_fast.data.datasets import read_instances

    path = write_coco(str(tmp_path), "val", num_images=4, seed=3)
    instances = read_instances(path)
    assert len(instances["images"]) == 4 and sorted(c["id"] for c in instances["categories"]) == [1, 2, 3, 4]
    for info in instances["images"]:
        image_id = info["id"]
        assert os.path.isfile(tmp_path / "val" / info["file_name"])
        expected = render(image_id - 1, seed=3)[1]
        annotations = [a for a in instances["annotations"] if a["image_id"] == image_id]
        assert [a["bbox"] for a in annotations] == [o["bbox"] for o in expected]
        assert [a["category_id"] for a in annotations] == [o["category_id"] + 1 for o in expected]
    stamp = os.path.getmtime(path)
    assert write_coco(str(tmp_path), "val", num_images=4, seed=3) == path and os.path.getmtime(path) == stamp
    write_coco(str(tmp_path), "val", num_images=5, seed=3)  # other arguments: rewritten
    with open(path) as f:
        assert len(json.load(f)["images"]) == 5


def test_panoptic_images_are_deterministic_and_fully_segmented():
    spec = SyntheticSpec(min_size=48, max_size=64)
    for index in range(6):
        image, segment_map, segments = render_panoptic(index, seed=3, spec=spec)
        again = render_panoptic(index, seed=3, spec=spec)
        assert np.array_equal(np.asarray(image), np.asarray(again[0])) and np.array_equal(segment_map, again[1])
        assert segment_map.shape == (image.height, image.width)
        assert set(np.unique(segment_map).tolist()) == {s["id"] for s in segments}  # no void, nothing unlisted
        stuff = [s for s in segments if not s["isthing"]]
        assert 2 <= len(stuff) <= 3 and all(s["category_id"] >= len(CLASSES) for s in stuff)
        assert all(s["category_id"] < len(CLASSES) for s in segments if s["isthing"])


def test_panoptic_split_loads_and_scores_perfectly_against_itself(tmp_path):
    spec = SyntheticSpec(min_size=48, max_size=64)
    image_dir, json_path, png_dir = write_coco_panoptic(str(tmp_path), "val", 5, seed=1, spec=spec)
    dataset = CocoPanoptic(image_dir, json_path, png_dir)
    assert len(dataset) == 5 and dataset.is_thing == [True] * len(CLASSES) + [False] * len(STUFF)
    image, target = dataset[0]
    assert target["masks"].shape == (len(target["class_labels"]), *image.shape[-2:])
    result = panoptic_quality_of_files(json_path, json_path, png_dir, png_dir)
    assert result["all"]["pq"] == 1.0 and result["things"]["n"] > 0 and result["stuff"]["n"] > 0
    modified = os.path.getmtime(json_path)
    write_coco_panoptic(str(tmp_path), "val", 5, seed=1, spec=spec)  # the same arguments: nothing rewritten
    assert os.path.getmtime(json_path) == modified
