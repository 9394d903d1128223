"""`detr-fast train` as a practitioner meets it: every option documented, bad choices refused before any work in one
line, own COCO-format data offline (no validation set needed), fine-tuning from a checkpoint with other classes."""

import dataclasses
import json
import os
import re

import pytest
import torch

from detr_fast.cli import build_parser
from detr_fast.cli import main as cli_main
from detr_fast.train import TrainConfig, train
from detr_fast.train.config import HELP
from detr_fast.train.loop import prepare
from detr_fast.train.options import NOT_OPTIONS

from .helpers import tiny_config, write_split

# The tiny model of tests/helpers.tiny_config, as command-line options.
TINY = ["--backbone", "resnet18", "--d-model", "32", "--encoder-layers", "1", "--decoder-layers", "2",
        "--num-queries", "6", "--no-pretrained-backbone", "--threads", "1", "--num-workers", "0"]  # fmt: skip


def own_data(root, categories=((1, "cat"), (5, "dog"), (17, "emu"))):
    """A small COCO-format set of the user's: category ids 1/5/17, a crowd box, an image without annotations."""
    images = [(f"{i}.png", 64, 48) for i in range(6)]
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16]},
        {"image_id": 1, "category_id": 17, "bbox": [30, 10, 20, 30], "iscrowd": 1},
        {"image_id": 2, "category_id": 5, "bbox": [10, 8, 30, 30]},
        {"image_id": 3, "category_id": 17, "bbox": [0, 0, 64, 48]},
        {"image_id": 4, "category_id": 1, "bbox": [40, 20, 10, 10]},
        {"image_id": 5, "category_id": 5, "bbox": [5, 25, 25, 20]},
    ]
    return write_split(root, images, annotations, categories)


def help_of(parser, flag: str) -> str:
    subparsers = next(a for a in parser._actions if a.dest == "command")
    train_parser = subparsers.choices["train"]
    return next(a for a in train_parser._actions if flag in a.option_strings).help


def test_every_train_option_has_help_and_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for action in subparsers.choices["train"]._actions:
        assert action.help, action.option_strings
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_OPTIONS
    assert fields <= set(HELP)
    for name in fields:
        assert "(default: " in help_of(parser, "--" + name.replace("_", "-")), name
    assert "(default: coco-r50: 4; synthetic: 32; synthetic-panoptic: 16)" in help_of(parser, "--batch-size")


@pytest.mark.parametrize(
    "options,message",
    [
        (["--train-images", "x", "--train-annotations", "y.json"], "dataset 'synthetic' generates its own images"),
        (["--batch-size", "0"], "batch-size must be positive, got 0"),
        (["--lr-drop", "1.5"], r"lr-drop is the fraction of the steps before the drop, in \(0, 1\], got 1.5"),
        (
            ["--dataset", "coco", "--train-images", "nowhere", "--train-annotations", "x.json", "--no-evaluate"],
            "--train-images: no such folder: nowhere",
        ),  # fmt: skip
        (["--dataset", "coco", "--train-images", "."], "dataset 'coco' needs --train-annotations, --val-images"),
        (["--resume"], "--resume: no checkpoint at"),
        (["--device", "gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ],
)
def test_bad_choices_fail_at_once_in_one_line(tmp_path, capsys, options, message):
    assert cli_main(["train", "--output-dir", str(tmp_path / "run"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detr-fast train: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # no work was done


def test_argparse_refuses_unknown_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "--amp", "fp16"])
    assert exited.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="batch-size must be positive"):
        cli_main(["train", "--debug", "--batch-size", "0", "--output-dir", str(tmp_path)])


def test_own_data_offline_without_a_validation_set(tmp_path, capsys):
    image_dir, annotations = own_data(tmp_path / "data")
    out = tmp_path / "run"
    options = ["--preset", "coco-r50", "--train-images", image_dir, "--train-annotations", annotations,
               "--no-evaluate", "--steps", "2", "--batch-size", "2", "--scales", "48", "--max-size", "64",
               "--crop-size", "none", "--eval-size", "48", "--output-dir", str(out), *TINY]  # fmt: skip
    assert cli_main(["train", *options]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/: checkpoint.pt, history.json, model/" in printed and "ETA" in printed
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["category_ids"] == [1, 5, 17] and config["id2label"] == {"0": "cat", "1": "dog", "2": "emu"}
    preprocessing = json.loads((out / "model" / "preprocessor_config.json").read_text())
    assert preprocessing["size"] == {"shortest_edge": 48, "longest_edge": 1333}


def test_fine_tuning_from_a_checkpoint_with_other_classes(tmp_path):
    pretrained = train(tiny_config(tmp_path / "a", steps=2, evaluate=False))  # 4 synthetic classes
    checkpoint = os.path.join(pretrained["config"].output_dir, "checkpoint.pt")
    image_dir, annotations = own_data(tmp_path / "data")
    cfg = tiny_config(
        tmp_path / "b", steps=1, evaluate=False, dataset="coco", data_dir=None, train_images=image_dir,
        train_annotations=annotations, init_from=checkpoint, synthetic_spec={},
    )  # fmt: skip
    before = torch.load(checkpoint, weights_only=True)["model"]
    run = prepare(cfg, resume=None)
    assert run.notes[0].startswith(f"initialized from {checkpoint}: ")
    assert "the class head starts afresh (4 labels in the checkpoint, 3 in the dataset)" in run.notes[1]
    not_loaded = "\n".join(run.notes[2:])
    assert "class_labels_classifier.weight: left at its initialization" in not_loaded
    state = run.model.state_dict()
    assert state["class_labels_classifier.weight"].shape == (4, 32)  # 3 classes + no-object
    for key in ("model.encoder.layers.0.self_attn.q_proj.weight", "bbox_predictor.layers.0.weight"):
        assert torch.equal(state[key], before[key]), key


def test_the_panoptic_demo_reports_pq_at_both_thresholds(tmp_path, capsys):
    """`detr-fast demo --task panoptic` end to end in a few steps: PQ at DETR's 0.85 in metrics.json, and at
    transformers' 0.5 in metrics-threshold-0.5.json, the same validation set scored twice."""
    pytest.importorskip("pycocotools")
    out = tmp_path / "demo"
    assert cli_main(["demo", "--task", "panoptic", "--steps", "2", "--output-dir", str(out)]) == 0
    strict = json.loads((out / "metrics.json").read_text())
    loose = json.loads((out / "metrics-threshold-0.5.json").read_text())
    assert strict["num_images"] == loose["num_images"] == 100 and loose["threshold"] == 0.5
    assert 0.0 <= strict["pq"] <= 1.0 and 0.0 <= loose["pq"] <= 1.0
    assert "at transformers' default threshold 0.5: PQ" in capsys.readouterr().out
