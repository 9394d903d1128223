"""Training segmentation models: `task="panoptic"` on the synthetic panoptic set trains a DetrForSegmentation that
learns and is evaluated by PQ, resumes exactly, and trains its mask head alone on a frozen detector
(`freeze_detector`, DETR's two-step recipe); wrong combinations of task, model and data are one-line errors."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from detr_fast import DetrForSegmentation
from detr_fast.data.synthetic import CLASSES, STUFF
from detr_fast.train import train
from detr_fast.train.config import validate
from detr_fast.train.engine import build_model

from .helpers import tiny_config

SEGMENTATION_MODEL = {
    "backbone_kwargs": {"out_indices": [1, 2, 3, 4], "zero_init_last": False},  # the mask head reads every level
    "encoder_attention_heads": 8,  # the mask head's width d_model + heads must be divisible by 8
    "decoder_attention_heads": 8,
    "dropout": 0.0,
    "num_queries": 10,
}


def panoptic_config(tmp_path, device, **overrides):
    overrides["model"] = {**SEGMENTATION_MODEL, **overrides.get("model", {})}
    overrides.setdefault("evaluate", True)  # PQ needs no pycocotools
    return tiny_config(tmp_path, device, task="panoptic", max_targets=6, **overrides)  # up to 3 things + 3 stuff


def test_a_panoptic_run_learns_and_reports_pq(tmp_path, device):
    cfg = panoptic_config(tmp_path, device, steps=30, synthetic_train_images=8, log_every=5)
    result = train(cfg)
    curve = [record["loss"] for record in result["history"] if "loss" in record]
    assert curve[-1] < 0.8 * curve[0], curve
    assert {"loss_mask", "loss_dice"} <= set(next(r for r in result["history"] if "loss" in r))
    metrics = result["metrics"]
    assert metrics["num_images"] == 4 and 0 <= metrics["pq"] <= 1 and {"pq_things", "pq_stuff"} <= set(metrics)
    assert [r["step"] for r in result["history"] if "pq" in r] == [30]
    model_dir = os.path.join(cfg.output_dir, "model")
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["architectures"] == ["DetrForSegmentation"]
    assert isinstance(DetrForSegmentation.from_pretrained(model_dir), DetrForSegmentation)
    if importlib.util.find_spec("matplotlib"):  # the pictures need it
        assert os.path.exists(os.path.join(cfg.output_dir, "curves.png"))
        assert os.path.exists(os.path.join(cfg.output_dir, "panoptic.png"))


def test_panoptic_pictures_colour_categories_and_shade_instances():
    pytest.importorskip("matplotlib")
    from detr_fast.plots import colour_segments

    segment_map = np.array([[0, 1, 1], [2, 2, 3]])
    segments = [{"id": 1, "category_id": 5}, {"id": 2, "category_id": 5}, {"id": 3, "category_id": 7}]
    picture = colour_segments(segment_map, segments)
    assert picture.shape == (2, 3, 3)
    assert (picture[0, 0] == 0).all()  # no segment: black
    assert (picture[0, 1] == picture[0, 2]).all()  # one segment, one colour
    first, second, other = picture[0, 1], picture[1, 0], picture[1, 2]
    np.testing.assert_allclose(second, 0.75 * first)  # the second instance of a category: a darker shade of it
    assert not np.allclose(other / other.max(), first / first.max())  # another category: another colour


def test_a_panoptic_run_resumes_exactly(tmp_path, device):
    whole = train(panoptic_config(tmp_path / "a", device, steps=4, evaluate=False))
    panoptic_config_b = panoptic_config(tmp_path / "b", device, steps=4, evaluate=False)
    train(panoptic_config_b, stop_after=2)
    resumed = train(panoptic_config_b, resume="auto")
    assert [r["loss"] for r in resumed["history"] if "loss" in r] == [
        r["loss"] for r in whole["history"] if "loss" in r
    ]


def test_freeze_detector_trains_the_mask_head_alone(tmp_path, device):
    labels = list(CLASSES + STUFF)  # the synthetic panoptic set's categories
    detector = build_model(tiny_config(tmp_path, device, model=SEGMENTATION_MODEL), labels, list(range(1, 8)))
    with torch.no_grad():
        for parameter in detector.parameters():  # weights no initialization gives
            parameter.add_(0.01)
    detector.save_pretrained(tmp_path / "detector")
    cfg = panoptic_config(
        tmp_path / "masks", device, steps=3, evaluate=False, freeze_detector=str(tmp_path / "detector")
    )
    initial = build_model(cfg, labels, list(range(1, 8)))
    train(cfg)
    trained = DetrForSegmentation.from_pretrained(os.path.join(cfg.output_dir, "model"))
    for name, tensor in detector.state_dict().items():
        assert torch.equal(trained.detr.state_dict()[name], tensor), name  # loaded, then frozen
    moved = [
        n for n, t in trained.mask_head.state_dict().items() if not torch.equal(t, initial.mask_head.state_dict()[n])
    ]
    assert moved  # the mask head trained
    with pytest.raises(ValueError, match="no such checkpoint"):
        validate(panoptic_config(tmp_path, device, freeze_detector=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="--freeze-detector trains a mask head"):
        validate(tiny_config(tmp_path, device, freeze_detector=str(tmp_path / "detector")))


def test_wrong_combinations_are_named(tmp_path, device):
    with pytest.raises(ValueError, match="the synthetic set has no instance masks"):
        validate(tiny_config(tmp_path, device, task="instance"))
    with pytest.raises(ValueError, match="architecture DetrForSegmentation learns masks"):
        validate(tiny_config(tmp_path, device, architecture="DetrForSegmentation"))
    with pytest.raises(ValueError, match="task must be one of detection, instance, panoptic"):
        validate(tiny_config(tmp_path, device, task="semantic"))
    with pytest.raises(ValueError, match="dataset 'coco' needs .*--train-panoptic-pngs"):
        validate(tiny_config(tmp_path, device, task="panoptic", dataset="coco", data_dir=None,
                             train_images=str(tmp_path), train_annotations=__file__, evaluate=False))  # fmt: skip
