"""Evaluation: COCO mAP of known predictions on a hand-built COCO file, the conversion of model outputs into COCO
results, and `evaluate` end to end with an oracle model."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detr_fast.data.datasets import CocoDetection, coco_api, read_instances
from detr_fast.data.transforms import eval_transforms
from detr_fast.evaluate import METRIC_NAMES, coco_metrics, detections_to_coco, evaluate
from detr_fast.reference.box_ops import corners_to_center

from .helpers import write_split

pytest.importorskip("pycocotools")

# One image, one category, two ground-truth boxes A and B (xywh).
BOX_A, BOX_B = [10, 10, 20, 20], [50, 50, 10, 16]


@pytest.fixture
def ground_truth(tmp_path):
    _, path = write_split(
        tmp_path,
        [("x.png", 100, 100)],
        [
            {"image_id": 1, "category_id": 3, "bbox": BOX_A, "area": 400},
            {"image_id": 1, "category_id": 3, "bbox": BOX_B, "area": 160},
        ],
        categories=((3, "thing"), (5, "other")),
    )
    return coco_api(read_instances(path), path)


def result(box, score, category=3):
    return {"image_id": 1, "category_id": category, "bbox": box, "score": score}


def test_perfect_detections_score_one(ground_truth):
    metrics = coco_metrics(ground_truth, [result(BOX_A, 0.9), result(BOX_B, 0.8)])
    assert metrics["map"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)
    assert list(metrics) == list(METRIC_NAMES)


def test_known_map_with_a_loose_box_and_a_false_positive(ground_truth):
    # B is found with IoU 0.625 (10x10 of its 10x16): a true positive at the IoU thresholds .5, .55, .6 only.
    # Above them only A is found: recall 1/2 at precision 1 -> 51 of COCO's 101 recall points.
    loose = [50, 50, 10, 10]
    metrics = coco_metrics(ground_truth, [result(BOX_A, 0.9), result(loose, 0.8)])
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10)
    # A false positive ranked first: precision 1/2 then 2/3 at full recall -> interpolated 2/3 everywhere.
    metrics = coco_metrics(ground_truth, [result([80, 0, 10, 10], 0.95), result(BOX_A, 0.9), result(BOX_B, 0.8)])
    assert metrics["map"] == pytest.approx(2 / 3) and metrics["map50"] == pytest.approx(2 / 3)
    # Right box, wrong category: nothing found for category 3 (category 5 has no ground truth and is not counted).
    assert coco_metrics(ground_truth, [result(BOX_A, 0.9, category=5)])["map"] == 0.0


def test_no_detections_is_zero_not_an_error(ground_truth):
    metrics = coco_metrics(ground_truth, [])
    assert metrics["map"] == 0.0 and metrics["map50"] == 0.0 and metrics["mar_100"] == 0.0
    assert metrics["map_large"] == -1.0  # no large ground truth: COCOeval's -1


def test_detections_to_coco_scales_to_the_original_pixels():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [4.0, 0.0, 0.0]]])  # [B=1, N=2, C+1=3]: query 0 -> label 1, query 1 -> 0
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.5, 0.5]]])  # cxcywh
    results = detections_to_coco(logits, boxes, [17], torch.tensor([[200, 100]]), label_to_category_id=[4, 9])
    probs = logits.softmax(-1)[0]
    assert [r["category_id"] for r in results] == [9, 4]
    assert results[0]["bbox"] == [25.0, 75.0, 50.0, 50.0] and results[1]["bbox"] == [0.0, 0.0, 50.0, 100.0]
    assert results[0]["score"] == pytest.approx(probs[0, 1].item(), abs=1e-5)
    assert results[1]["score"] == pytest.approx(probs[1, 0].item(), abs=1e-5)
    assert all(r["image_id"] == 17 for r in results)


class Oracle(nn.Module):
    """Predicts the ground truth of the images it is shown, in dataset order (normalized to the resized image)."""

    def __init__(self, dataset, num_queries=4):
        super().__init__()
        self.config = SimpleNamespace(num_labels=len(dataset.label_to_category_id))
        self.answers = []
        for record in dataset.images:
            height, width = record["size"]
            boxes = corners_to_center(record["boxes"]) / torch.tensor([width, height, width, height])
            self.answers.append((boxes, record["class_labels"]))
        self.num_queries = num_queries
        self.seen = 0

    def forward(self, pixel_values, pixel_mask):
        logits = torch.full((len(pixel_values), self.num_queries, self.config.num_labels + 1), -10.0)
        logits[..., -1] = 10.0  # unused queries say "no object"
        boxes = torch.full((len(pixel_values), self.num_queries, 4), 0.5)
        for i in range(len(pixel_values)):
            target_boxes, labels = self.answers[self.seen]
            self.seen += 1
            boxes[i, : len(labels)] = target_boxes
            logits[i, torch.arange(len(labels)), labels] = 10.0
            logits[i, : len(labels), -1] = -10.0
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


def test_evaluate_an_oracle_through_resize_and_padding(tmp_path):
    images = [("a.png", 40, 30), ("b.png", 20, 50), ("c.png", 64, 64)]
    annotations = [
        {"image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 12]},
        {"image_id": 1, "category_id": 11, "bbox": [0, 0, 40, 30]},
        {"image_id": 2, "category_id": 3, "bbox": [2, 10, 10, 30]},
        {"image_id": 3, "category_id": 3, "bbox": [30, 30, 30, 20]},
    ]
    dataset = CocoDetection(*write_split(tmp_path, images, annotations), transforms=eval_transforms(48, 80))
    metrics = evaluate(Oracle(dataset), dataset, batch_size=2)
    assert metrics["map"] == pytest.approx(1.0, abs=1e-6) and metrics["num_detections"] == 3 * 4
    assert metrics["num_images"] == 3
    with pytest.raises(ValueError, match="the model has 3 labels but"):
        evaluate(
            Oracle(dataset),
            CocoDetection(*write_split(tmp_path / "b", images[:1], annotations[:1], categories=((3, "a"), (7, "b")))),
        )
    json.dumps(metrics)  # the metrics are plain JSON values


IMAGES = [("a.png", 40, 30), ("b.png", 20, 50), ("c.png", 64, 64)]
ANNOTATIONS = [
    {"image_id": 1, "category_id": 7, "bbox": [4, 3, 20, 12]},
    {"image_id": 2, "category_id": 3, "bbox": [2, 10, 10, 30]},
    {"image_id": 3, "category_id": 11, "bbox": [30, 30, 30, 20]},
]


def test_the_models_own_category_ids_and_names_are_used(tmp_path):
    """A model trained on categories 3/7/11 labels them 0/1/2 and records the ids; evaluated on a file that has
    more categories it maps its labels back to those ids, and says when names differ."""
    categories = ((1, "ant"), (3, "cat"), (7, "dog"), (11, "emu"))
    dataset = CocoDetection(*write_split(tmp_path, IMAGES, ANNOTATIONS, categories=categories))
    oracle = Oracle(CocoDetection(*write_split(tmp_path / "train", IMAGES, ANNOTATIONS)))  # labels of 3/7/11
    oracle.config.category_ids = [3, 7, 11]
    assert evaluate(oracle, dataset, batch_size=2)["map"] == pytest.approx(1.0, abs=1e-6)
    oracle.config.id2label = {0: "cat", 1: "wolf", 2: "emu"}
    oracle.seen = 0
    with pytest.warns(UserWarning, match="class names differ .*: label 1 is 'wolf', category 7 is 'dog'"):
        evaluate(oracle, dataset, batch_size=2)
    oracle.config.category_ids = [3, 7, 12]
    with pytest.raises(ValueError, match=r"predicts category ids \[12\] that .* does not have"):
        evaluate(oracle, dataset)


def test_an_unreadable_image_skipped_is_not_counted_as_missed(tmp_path):
    image_dir, path = write_split(tmp_path, IMAGES, ANNOTATIONS)
    with open(f"{image_dir}/b.png", "wb") as f:
        f.write(b"not a png")
    dataset = CocoDetection(image_dir, path, on_bad="skip")
    answers = [ANNOTATIONS[0], {**ANNOTATIONS[2], "image_id": 2}]  # the readable images a and c, in order
    oracle = Oracle(CocoDetection(*write_split(tmp_path / "answers", IMAGES[::2], answers)))
    metrics = evaluate(oracle, dataset, batch_size=3)
    assert metrics["num_images"] == 2 and metrics["num_skipped"] == 1
    assert metrics["map"] == pytest.approx(1.0, abs=1e-6)  # b.png's object is not a miss
