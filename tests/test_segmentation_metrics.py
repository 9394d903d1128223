"""Segmentation evaluation end to end: a model that predicts the ground truth (its masks at stride 4, its classes
one-hot) scores PQ and mask mAP near 1, one that predicts nothing scores 0, and a random DetrForSegmentation runs
through the evaluation and `detr-fast eval --panoptic-pngs`; images batched with padding are scored on their own
pixels."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_fast import DetrConfig, DetrForObjectDetection, DetrForSegmentation, cli
from detr_fast.cli import main as cli_main
from detr_fast.data.datasets import CocoDetection, CocoPanoptic
from detr_fast.data.synthetic import CLASSES, STUFF, SyntheticSpec, write_coco_panoptic
from detr_fast.segmentation_metrics import evaluate_instances, evaluate_panoptic

from .helpers import HAS_COCO, write_split

SPEC = SyntheticSpec(min_size=128, max_size=160)  # large enough that stride-4 masks keep the shapes' outlines
QUERIES = 12


class GroundTruthModel(nn.Module):
    """Predicts, for the items of `dataset` in order, their own targets: the masks averaged to stride 4 as logits
    (+-10 around half coverage), the classes one-hot; `empty=True` predicts no object anywhere; `unsure=True`
    gives the right class probability 0.62 only (logit 0.5 against 0 for no object)."""

    def __init__(
        self, dataset, num_labels: int, empty: bool = False, split: set[int] = frozenset(), unsure: bool = False
    ):
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels)
        self.targets = iter([dataset[i][1] for i in range(len(dataset))])
        self.empty = empty
        self.unsure = unsure
        self.split = split  # labels whose masks two queries predict, the left and the right half

    def forward(self, pixel_values, pixel_mask):
        batch, _, height, width = pixel_values.shape
        logits = torch.full((batch, QUERIES, self.config.num_labels + 1), -10.0)
        logits[..., -1] = 10.0  # no object
        # a ResNet's stride-4 maps have ceil(H/4) x ceil(W/4) cells, as the mask head's output
        pred_masks = torch.full((batch, QUERIES, -(-height // 4), -(-width // 4)), -10.0)
        for i in range(batch):
            target = next(self.targets)
            if self.empty:
                continue
            masks = torch.zeros(len(target["masks"]), pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4)
            masks[:, : target["masks"].shape[1], : target["masks"].shape[2]] = target["masks"].float()
            labels = target["class_labels"]
            halves = [k for k, label in enumerate(labels.tolist()) if label in self.split]
            if halves:  # the right halves as extra queries, the left halves stay
                right = masks[halves].clone()
                right[..., : masks.shape[-1] // 2] = 0
                masks[halves, :, masks.shape[-1] // 2 :] = 0
                masks, labels = torch.cat([masks, right]), torch.cat([labels, labels[halves]])
            coverage = F.avg_pool2d(masks[None], 4)[0]  # [M, H/4, W/4]: each cell's fraction of the mask
            count = len(masks)
            pred_masks[i, :count] = (coverage - 0.5) * 20
            logits[i, torch.arange(count), labels] = 0.5 if self.unsure else 10.0
            logits[i, :count, -1] = 0.0 if self.unsure else -10.0
        return SimpleNamespace(logits=logits, pred_masks=pred_masks)


@pytest.fixture
def panoptic_split(tmp_path):
    image_dir, json_path, png_dir = write_coco_panoptic(str(tmp_path), "val", 4, seed=2, spec=SPEC)
    return CocoPanoptic(image_dir, json_path, png_dir)


def test_predicting_the_ground_truth_scores_pq_near_1(panoptic_split):
    labels = len(CLASSES) + len(STUFF)
    metrics = evaluate_panoptic(GroundTruthModel(panoptic_split, labels), panoptic_split, batch_size=1)
    assert metrics["num_images"] == 4
    assert metrics["rq"] == 1.0  # every segment found, nothing spurious
    assert metrics["pq_things"] > 0.9 and metrics["pq_stuff"] > 0.95  # the outlines' stride-4 loss only
    for batch_size in (2, 3):  # padded batches: each image scored on its own pixels, the same
        assert evaluate_panoptic(GroundTruthModel(panoptic_split, labels), panoptic_split, batch_size) == metrics
    empty = GroundTruthModel(panoptic_split, len(CLASSES) + len(STUFF), empty=True)
    assert evaluate_panoptic(empty, panoptic_split)["pq"] == 0.0
    # stuff predicted by two queries each: fused into one segment per category, scored as the whole
    stuff = set(range(len(CLASSES), labels))
    fused = evaluate_panoptic(GroundTruthModel(panoptic_split, labels, split=stuff), panoptic_split)
    assert fused["rq_stuff"] == 1.0 and fused["pq_stuff"] > 0.95


def test_the_threshold_decides_what_is_a_segment(panoptic_split):
    """A model right about every segment at class probability 0.62: no segment at DETR's 0.85, all at 0.5."""
    labels = len(CLASSES) + len(STUFF)
    unsure = evaluate_panoptic(GroundTruthModel(panoptic_split, labels, unsure=True), panoptic_split, batch_size=2)
    assert unsure["pq"] == 0.0 and unsure["rq"] == 0.0
    model = GroundTruthModel(panoptic_split, labels, unsure=True)
    assert evaluate_panoptic(model, panoptic_split, batch_size=2, threshold=0.5)["rq"] == 1.0


def test_a_random_segmentation_model_is_evaluated(panoptic_split):
    config = DetrConfig(backbone="resnet18", num_labels=len(CLASSES) + len(STUFF), d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, num_queries=QUERIES)  # fmt: skip
    metrics = evaluate_panoptic(DetrForSegmentation(config), panoptic_split, batch_size=2, threshold=0.0)
    assert metrics["num_images"] == 4 and 0.0 <= metrics["pq"] <= 1.0
    assert set(metrics["per_category"]) == set(range(1, len(CLASSES) + len(STUFF) + 1))


@pytest.mark.skipif(not HAS_COCO, reason="mask mAP needs pycocotools")
def test_predicting_the_ground_truth_scores_mask_map_near_1(tmp_path):
    def square(x, y, side):
        return [[x, y, x + side, y, x + side, y + side, x, y + side]]

    annotations = [
        {"image_id": 1, "category_id": 7, "bbox": [4, 4, 16, 16], "segmentation": square(4, 4, 16), "area": 256},
        {"image_id": 1, "category_id": 3, "bbox": [24, 8, 12, 12], "segmentation": square(24, 8, 12), "area": 144},
        {"image_id": 2, "category_id": 11, "bbox": [8, 20, 20, 20], "segmentation": square(8, 20, 20), "area": 400},
    ]
    dataset = CocoDetection(*write_split(tmp_path, [("a.png", 40, 32), ("b.png", 36, 44)], annotations), masks=True)
    json.dumps(dataset.instances)  # the ground truth stays plain JSON
    metrics = evaluate_instances(GroundTruthModel(dataset, 3), dataset, batch_size=2)
    assert metrics["num_images"] == 2 and metrics["mask_map"] > 0.8 and metrics["mask_map50"] == pytest.approx(1.0)
    assert evaluate_instances(GroundTruthModel(dataset, 3, empty=True), dataset)["mask_map"] == 0.0
    assert np.isfinite(list(metrics.values())).all()


@pytest.mark.skipif(not HAS_COCO, reason="mask mAP needs pycocotools")
def test_the_things_of_a_panoptic_set_are_its_instances(panoptic_split):
    from detr_fast.segmentation_metrics import thing_instances

    coco = thing_instances(panoptic_split)
    things = [s for a in panoptic_split.panoptic["annotations"] for s in a["segments_info"] if s["category_id"] <= 4]
    assert len(coco.dataset["annotations"]) == len(things) > 0
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))  # no stuff category
    for annotation, segment in zip(coco.dataset["annotations"], things, strict=True):
        assert annotation["area"] == segment["area"] and annotation["bbox"] == segment["bbox"]
    labels = len(CLASSES) + len(STUFF)
    metrics = evaluate_instances(GroundTruthModel(panoptic_split, labels), panoptic_split, batch_size=2)
    # the stuff queries are no instances (their categories are not scored), the things' masks are exact up to
    # the stride-4 outlines
    assert metrics["num_images"] == 4 and metrics["mask_map50"] == pytest.approx(1.0) and metrics["mask_map"] > 0.8
    # PQ and the mask mAP from one pass over the model's outputs: each as computed alone
    both = evaluate_panoptic(GroundTruthModel(panoptic_split, labels), panoptic_split, batch_size=2, masks=True)
    assert {k: v for k, v in both.items() if k.startswith("mask_")} == {
        k: v for k, v in metrics.items() if k.startswith("mask_")
    }
    alone = evaluate_panoptic(GroundTruthModel(panoptic_split, labels), panoptic_split, batch_size=2)
    assert {k: v for k, v in both.items() if not k.startswith("mask_")} == alone
    assert evaluate_instances(GroundTruthModel(panoptic_split, labels, empty=True), panoptic_split)["mask_map"] == 0


def test_detr_fast_eval_gives_pq_and_names_a_wrong_model(panoptic_split, tmp_path, capsys, monkeypatch):
    config = DetrConfig(backbone="resnet18", num_labels=len(CLASSES) + len(STUFF), d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, num_queries=QUERIES)  # fmt: skip
    DetrForSegmentation(config).save_pretrained(tmp_path / "segmentation")
    DetrForObjectDetection(config).save_pretrained(tmp_path / "detector")
    files = ["--images", panoptic_split.image_dir, "--annotations", panoptic_split.annotation_file,
             "--panoptic-pngs", panoptic_split.png_dir, "--device", "cpu", "--num-workers", "0",
             "--batch-size", "2"]  # fmt: skip
    out = tmp_path / "metrics.json"
    assert cli_main(["eval", str(tmp_path / "segmentation"), *files, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 4 and {"pq", "sq", "rq", "pq_things", "pq_stuff"} <= set(metrics)
    assert metrics["threshold"] == 0.85 and "PQ " in capsys.readouterr().out  # DETR's threshold by default
    seen = []  # --threshold reaches the evaluation (its effect: test_the_threshold_decides_what_is_a_segment)
    monkeypatch.setattr(cli, "evaluate_panoptic", lambda *a, **k: seen.append(a[5]) or evaluate_panoptic(*a, **k))
    assert cli_main(["eval", str(tmp_path / "segmentation"), *files, "--threshold", "0.5", "--out", str(out)]) == 0
    assert seen == [0.5] and json.loads(out.read_text())["threshold"] == 0.5
    assert cli_main(["eval", str(tmp_path / "segmentation"), *files, "--threshold", "1.5"]) == 2
    assert "--threshold is a class probability in [0, 1], got 1.5" in capsys.readouterr().err
    no_pngs = files[: files.index("--panoptic-pngs")] + files[files.index("--panoptic-pngs") + 2 :]
    assert cli_main(["eval", str(tmp_path / "segmentation"), *no_pngs, "--threshold", "0.5"]) == 2
    assert "--threshold applies to PQ (with --panoptic-pngs)" in capsys.readouterr().err
    if HAS_COCO:  # with --masks also the things' mask mAP
        assert cli_main(["eval", str(tmp_path / "segmentation"), *files, "--masks", "--out", str(out)]) == 0
        assert 0.0 <= json.loads(out.read_text())["mask_map"] <= 1.0 and "mask mAP" in capsys.readouterr().out
    assert cli_main(["eval", str(tmp_path / "detector"), *files]) == 2
    assert "holds a DetrForObjectDetection; mask mAP and PQ need a DetrForSegmentation" in capsys.readouterr().err
