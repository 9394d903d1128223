"""Panoptic quality against panopticapi's own pq_compute on generated COCO panoptic sets (things, stuff, crowd
regions, void pixels, misses, false positives, wrong categories), a hand-computed case, and the errors."""

import json

import numpy as np
import pytest
from PIL import Image

from detr_fast.panoptic_quality import PanopticCounts, panoptic_quality, panoptic_quality_of_files
from detr_fast.processing.annotations import id_to_rgb

CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 5, "name": "emu", "isthing": 1},
    {"id": 10, "name": "grass", "isthing": 0},
    {"id": 11, "name": "sky", "isthing": 0},
]
KINDS = {c["id"]: bool(c["isthing"]) for c in CATEGORIES}


def random_image(rng: np.random.Generator, height: int = 36, width: int = 44):
    """A ground-truth map with two stuff regions, 2-5 things (one maybe crowd) and void pixels, and a prediction
    that moves, drops, relabels and invents segments."""
    gt = np.zeros((height, width), np.int64)
    gt_segments = []
    split = rng.integers(8, height - 8)
    for segment_id, (category, rows) in enumerate([(10, slice(0, split)), (11, slice(split, height))], start=1000):
        gt[rows] = segment_id
        gt_segments.append({"id": segment_id, "category_id": category, "iscrowd": 0})
    for segment_id in range(1, rng.integers(3, 7)):
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        h, w = rng.integers(4, 14), rng.integers(4, 14)
        gt[y : y + h, x : x + w] = segment_id
        crowd = int(segment_id == 1 and rng.random() < 0.4)
        gt_segments.append({"id": segment_id, "category_id": int(rng.choice([1, 2, 5])), "iscrowd": crowd})
    gt[rng.random((height, width)) < 0.05] = 0  # void pixels
    gt_segments = [s for s in gt_segments if (gt == s["id"]).any()]

    pred = np.zeros_like(gt)
    pred_segments = []
    for next_id, segment in enumerate(gt_segments, start=1):
        if rng.random() < 0.15:
            continue  # a miss
        ys, xs = np.nonzero(gt == segment["id"])
        dy, dx = rng.integers(-3, 4, size=2)
        pred[np.clip(ys + dy, 0, height - 1), np.clip(xs + dx, 0, width - 1)] = next_id
        category = segment["category_id"]
        if KINDS[category] and rng.random() < 0.15:
            category = int(rng.choice([1, 2, 5]))  # a wrong class
        pred_segments.append({"id": next_id, "category_id": category})
    for extra in range(rng.integers(0, 3)):  # false positives, some of them on void or crowd pixels
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        pred[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = 100 + extra
        pred_segments.append({"id": 100 + extra, "category_id": int(rng.choice([1, 2, 5, 10]))})
    pred[rng.random((height, width)) < 0.03] = 0
    pred_segments = [s for s in pred_segments if (pred == s["id"]).any()]
    return gt, gt_segments, pred, pred_segments


def write_set(folder, images, side):
    """COCO panoptic JSON + PNGs of one side ("gt" or "pred"); the ground truth with COCO's areas."""
    (folder / side).mkdir()
    annotations = []
    for image_id, (segment_map, segments) in enumerate(images):
        file_name = f"{image_id:04d}.png"
        Image.fromarray(id_to_rgb(segment_map)).save(folder / side / file_name)
        infos = [dict(s) for s in segments]
        if side == "gt":
            for info in infos:
                info["area"] = int((segment_map == info["id"]).sum())
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": infos})
    path = folder / f"{side}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": CATEGORIES}))
    return str(path), str(folder / side)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_panopticapi_on_generated_sets(tmp_path, seed, capsys):
    evaluation = pytest.importorskip("panopticapi.evaluation", reason="make test installs panopticapi-lite")
    rng = np.random.default_rng(seed)
    images = [random_image(rng) for _ in range(6)]
    gt_json, gt_folder = write_set(tmp_path, [(g, gs) for g, gs, _, _ in images], "gt")
    pred_json, pred_folder = write_set(tmp_path, [(p, ps) for _, _, p, ps in images], "pred")
    theirs = evaluation.pq_compute(gt_json, pred_json, gt_folder, pred_folder)
    ours = panoptic_quality_of_files(gt_json, pred_json, gt_folder, pred_folder)
    for name, their_name in (("all", "All"), ("things", "Things"), ("stuff", "Stuff")):
        assert ours[name]["n"] == theirs[their_name]["n"]
        for metric in ("pq", "sq", "rq"):
            assert ours[name][metric] == pytest.approx(theirs[their_name][metric], abs=1e-12), (name, metric)
    for category, metrics in theirs["per_class"].items():
        assert ours["per_category"][category] == pytest.approx(metrics, abs=1e-12)
    assert 0 < ours["all"]["pq"] < 1  # the generated sets are neither perfect nor empty
    # the in-memory form gives the same
    in_memory = panoptic_quality(images, CATEGORIES)
    assert in_memory["all"] == pytest.approx(ours["all"])


def test_a_hand_computed_case():
    """cat: one match of IoU 6/8, one miss (predicted as grass), one false positive -> PQ = 0.75 / 2; a dog
    predicted on void pixels only is no false positive; grass: IoU 15/23 (21 predicted pixels, 17 true ones, 15
    shared)."""
    gt = np.full((4, 8), 9)  # grass
    gt[0:2, 0:4] = 1  # cat 1, 8 pixels
    gt[2:4, 6:8] = 2  # cat 2, 4 pixels, missed
    gt[3, 0:3] = 0  # void, 3 pixels: grass keeps 17
    pred = np.full((4, 8), 9)
    pred[0:2, 0:3] = 1  # 6 of cat 1's pixels
    pred[2, 4:6] = 3  # a false positive cat on grass
    pred[3, 0:3] = 4  # a dog on void only
    gt_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 9, "category_id": 10}]
    pred_segments = [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 1}, {"id": 4, "category_id": 2},
                     {"id": 9, "category_id": 10}]  # fmt: skip
    counts = PanopticCounts({1: True, 2: True, 10: False})
    counts.update(gt, gt_segments, pred, pred_segments)
    cat, dog, grass = (counts.per_category[c] for c in (1, 2, 10))
    assert (cat.tp, cat.fp, cat.fn, cat.iou) == (1, 1, 1, 0.75)
    assert (dog.tp, dog.fp, dog.fn) == (0, 0, 0)
    assert (grass.tp, grass.fp, grass.fn) == (1, 0, 0) and grass.iou == pytest.approx(15 / 23)
    result = counts.summary()
    assert result["things"] == pytest.approx({"pq": 0.375, "sq": 0.75, "rq": 0.5, "n": 1})
    assert result["stuff"] == pytest.approx({"pq": 15 / 23, "sq": 15 / 23, "rq": 1.0, "n": 1})
    assert result["all"]["pq"] == pytest.approx((0.375 + 15 / 23) / 2)


def test_nothing_to_score_gives_zeros():
    counts = PanopticCounts({1: True, 10: False})
    counts.update(np.zeros((3, 3), np.int64), [], np.zeros((3, 3), np.int64), [])
    assert counts.summary()["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def test_errors_name_the_image_and_the_segment(tmp_path):
    counts = PanopticCounts(KINDS)
    gt, pred = np.ones((4, 4), np.int64), np.full((4, 4), 7)
    with pytest.raises(ValueError, match="image: prediction segment 7 is in the map but not in its segments_info"):
        counts.update(gt, [{"id": 1, "category_id": 10}], pred, [])
    with pytest.raises(ValueError, match="prediction segment 8 is listed but absent from its map"):
        counts.update(
            gt, [{"id": 1, "category_id": 10}], pred, [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}]
        )
    with pytest.raises(ValueError, match="prediction segment 7 has unknown category 3"):
        counts.update(gt, [{"id": 1, "category_id": 10}], pred, [{"id": 7, "category_id": 3}])
    with pytest.raises(ValueError, match=r"the ground-truth map is \(4, 4\) but the prediction \(4, 5\)"):
        counts.update(gt, [], np.zeros((4, 5), np.int64), [])
    gt_json, gt_folder = write_set(tmp_path, [(gt, [{"id": 1, "category_id": 10}])], "gt")
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"no prediction for image 0 \(0000.png\)"):
        panoptic_quality_of_files(gt_json, str(tmp_path / "pred.json"), gt_folder, gt_folder)
