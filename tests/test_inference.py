"""From images to detections: the three-line Python path, the Detector, `detr-fast predict`, and a checkpoint
directory saved by transformers (model and processor) loading as it is, with transformers' pipeline's detections."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_fast import DetrConfig, DetrForObjectDetection, DetrImageProcessor
from detr_fast.cli import main as cli_main
from detr_fast.inference import Detector

from .helpers import tiny_config_kwargs

SIZES = [(48, 64), (60, 40), (33, 77)]


def saved_model(tmp_path):
    """A tiny random detector with three named labels and category ids, saved with its image processor."""
    kwargs = tiny_config_kwargs(num_labels=3, id2label={0: "cat", 1: "dog", 2: "emu"}, category_ids=[1, 5, 17])
    kwargs.pop("use_timm_backbone")
    torch.manual_seed(0)
    model = DetrForObjectDetection(DetrConfig(**kwargs)).eval()
    with torch.no_grad():
        model.class_labels_classifier.bias[0] += 6.0  # confident enough to pass the threshold
    model.save_pretrained(tmp_path / "model")
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path / "model")
    return model


def write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(folder.iterdir())


def test_three_lines_and_the_detector_agree(tmp_path):
    saved_model(tmp_path)
    paths = write_images(tmp_path / "images")
    images = [Image.open(p) for p in paths]
    processor = DetrImageProcessor.from_pretrained(tmp_path / "model")
    model = DetrForObjectDetection.from_pretrained(str(tmp_path / "model"))
    with torch.no_grad():
        outputs = model(**processor(images))
    results = processor.post_process_object_detection(outputs, 0.5, target_sizes=[im.size[::-1] for im in images])
    detector = Detector.from_pretrained(str(tmp_path / "model"), device="cpu")
    detections = detector(paths, threshold=0.5, batch_size=3)  # the same batch, so the same padding
    assert len(detections) == len(paths)
    for result, found in zip(results, detections, strict=True):
        assert len(found) == len(result["scores"]) > 0
        order = result["scores"].argsort(descending=True)
        assert [d["score"] for d in found] == pytest.approx(result["scores"][order].tolist(), abs=1e-4)
        for d, box in zip(found, result["boxes"][order]):
            assert d["box"] == pytest.approx(box.tolist(), abs=1e-2)
            assert d["label"] == ["cat", "dog", "emu"][d["label_id"]] and d["category_id"] == [1, 5, 17][d["label_id"]]


def test_the_detector_runs_its_own_folded_copy(tmp_path):
    """The detector folds the backbone's BatchNorm into its copy of the model; the model it was given keeps its
    norms and weights (it may go on training)."""
    model = saved_model(tmp_path)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    detector = Detector(model, device="cpu")
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in detector.model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_predict_writes_coco_results_and_pictures(tmp_path, capsys):
    saved_model(tmp_path)
    paths = write_images(tmp_path / "images")
    out = tmp_path / "out"
    assert cli_main(["predict", str(tmp_path / "images"), "--checkpoint", str(tmp_path / "model"),
                     "--out", str(out), "--threshold", "0.5", "--batch-size", "2", "--device", "cpu"]) == 0  # fmt: skip
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["file_name"] for r in results} <= {p.name for p in paths}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "file_name"} and r["category_id"] in (1, 5, 17)
        height, width = SIZES[int(r["image_id"])]
        x, y, w, h = r["bbox"]
        assert -1 <= x and x + w <= width + 1 and -1 <= y and y + h <= height + 1  # the original image's pixels
    for p in paths:
        assert Image.open(out / f"{p.name}.detections.png").size == Image.open(p).size
    assert "detection(s) above 0.5 in 3 image(s)" in capsys.readouterr().out
    assert cli_main(["predict", str(tmp_path / "nothing"), "--checkpoint", str(tmp_path / "model")]) == 2


@pytest.mark.transformers
def test_a_transformers_checkpoint_directory_loads_as_is_with_the_pipelines_detections(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DetrConfig(**tiny_config_kwargs(num_labels=3))
    hf_model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():
        hf_model.class_labels_classifier.bias[0] += 6.0
    hf_processor = transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    hf_model.save_pretrained(tmp_path / "hf")
    hf_processor.save_pretrained(tmp_path / "hf")
    paths = write_images(tmp_path / "images")
    pipeline = transformers.pipeline("object-detection", model=hf_model, image_processor=hf_processor, device="cpu")
    expected = pipeline([str(p) for p in paths], threshold=0.5)
    found = Detector.from_pretrained(str(tmp_path / "hf"), device="cpu")(paths, threshold=0.5)
    for theirs, ours in zip(expected, found, strict=True):
        theirs = sorted(theirs, key=lambda d: -d["score"])
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4) and a["label"] == b["label"]
            box = b["box"]
            assert a["box"] == pytest.approx([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], abs=1)
