"""The built-in synthetic shapes: deterministic, valid COCO, objects where the annotations say."""

import json
import os

import numpy as np
import pytest

from detr_fast.data.synthetic import CLASSES, SyntheticSpec, _covered_fraction, render, write_coco


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
