"""DetrImageProcessor against transformers' (torchvision backend) on the same inputs: pixel values, pixel masks and
labels equal (bit for bit: the same resize, the same float32 arithmetic in the same order), for image kinds, sizes,
padding, detection annotations with masks and crowd objects, panoptic PNGs; where transformers' fails, ours works;
its configuration file; post-processing."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from detr_fast import DetrImageProcessor
from detr_fast.data.transforms import eval_transforms

transformers = pytest.importorskip("transformers")
pytest.importorskip("pycocotools")
pytestmark = pytest.mark.transformers

SIZES = [(480, 640), (300, 500), (1000, 200), (37, 61)]
# transformers' torchvision-backed processor: DetrImageProcessor from v5 on, DetrImageProcessorFast in v4 (whose
# DetrImageProcessor is the PIL/numpy one).
TheirProcessor = (
    transformers.DetrImageProcessor
    if int(transformers.__version__.split(".")[0]) >= 5
    else transformers.DetrImageProcessorFast
)


def images(kind="pil", sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    if kind == "pil":
        return [Image.fromarray(a) for a in arrays]
    if kind == "numpy":
        return arrays
    return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]


def square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def detection_annotations(with_crowd=False):
    annotations = []
    for image_id, (h, w) in enumerate(SIZES):
        objects = [
            {
                "bbox": [2, 3, w / 3, h / 4],
                "category_id": 3,
                "area": w * h / 12,
                "iscrowd": 0,
                "segmentation": square(2, 3, min(w, h) / 4),
            },
            {
                "bbox": [w / 2, h / 2, w / 2 + 5, 10],
                "category_id": 17,
                "area": 50.0,
                "iscrowd": 0,
                "segmentation": square(w / 2, h / 2, 8),
            },
        ]  # fmt: skip  (the second box reaches past the image: clipped)
        if with_crowd:
            objects.append({"bbox": [0, 0, 10, 10], "category_id": 5, "area": 100.0, "iscrowd": 1,
                            "segmentation": {"counts": [0, 100, h * w - 100], "size": [h, w]}})  # fmt: skip
        annotations.append({"image_id": image_id, "annotations": objects})
    return annotations


def assert_same(ours, theirs):
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert ("pixel_mask" in ours) == ("pixel_mask" in theirs)
    if "pixel_mask" in theirs:
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
    assert ("labels" in ours) == ("labels" in theirs)
    for mine, reference in zip(ours.get("labels", []), theirs.get("labels", []), strict=True):
        assert set(mine) == set(reference)
        for key in reference:
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(reference[key])), key


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"size": {"height": 320, "width": 480}},
        {"size": {"max_height": 400, "max_width": 300}},
        {"size": {"shortest_edge": 200, "longest_edge": 250}},
        {"do_pad": True, "pad_size": {"height": 1400, "width": 1400}},
        {"do_resize": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"resample": 3},
    ],
    ids=[
        "default",
        "height-width",
        "max-height-width",
        "small",
        "pad-size",
        "no-resize",
        "rescale-only",
        "raw",
        "bicubic",
    ],  # fmt: skip
)
def test_pixels_equal_transformers(kind, options):
    ours, theirs = DetrImageProcessor(**options), TheirProcessor(**options)
    assert_same(ours(images(kind)), theirs(images(kind), return_tensors="pt"))
    assert_same(ours(images(kind)[1]), theirs(images(kind)[1], return_tensors="pt"))  # a single image


def test_one_size_batch_without_padding():
    batch = images("pil", sizes=[(60, 80)] * 3)
    options = {"do_pad": False, "size": {"height": 64, "width": 96}}
    assert_same(DetrImageProcessor(**options)(batch), TheirProcessor(**options)(batch, return_tensors="pt"))


@pytest.mark.parametrize("masks", [False, True], ids=["boxes", "masks"])
def test_detection_annotations_equal_transformers(masks):
    annotations = detection_annotations()
    ours = DetrImageProcessor()(images(), annotations=annotations, return_segmentation_masks=masks)
    theirs = TheirProcessor()(images(), annotations=annotations, return_segmentation_masks=masks, return_tensors="pt")
    assert_same(ours, theirs)
    assert ours["labels"][0]["boxes"].shape == (2, 4) and ours["labels"][0]["class_labels"].tolist() == [3, 17]


def test_crowd_objects_and_images_without_objects_work_where_transformers_fails():
    annotations = detection_annotations(with_crowd=True)
    annotations[3]["annotations"] = []
    with pytest.raises(IndexError):  # the crowd object's mask misaligns its masks with its boxes
        TheirProcessor()(images(), annotations=annotations, return_segmentation_masks=True)
    only_empty = [{"image_id": 0, "annotations": []}]
    with pytest.raises(RuntimeError, match="stack expects a non-empty TensorList"):
        TheirProcessor()(images()[:1], annotations=only_empty, return_segmentation_masks=True)
    ours = DetrImageProcessor()(images(), annotations=annotations, return_segmentation_masks=True)
    height, width = ours["pixel_values"].shape[-2:]
    for i, labels in enumerate(ours["labels"]):
        count = 0 if i == 3 else 2  # crowd objects are no targets, as in DETR
        assert labels["masks"].shape == (count, height, width) and labels["boxes"].shape == (count, 4)
    # The crowd-free part equals transformers'.
    theirs = TheirProcessor()(
        images()[:3], annotations=detection_annotations()[:3], return_segmentation_masks=True, return_tensors="pt"
    )
    assert_same(DetrImageProcessor()(images()[:3], annotations=detection_annotations()[:3],
                                     return_segmentation_masks=True), theirs)  # fmt: skip
    empty = DetrImageProcessor()(images()[:1], annotations=only_empty, return_segmentation_masks=True)
    assert empty["labels"][0]["masks"].shape[0] == 0


def panoptic_case(tmp_path):
    """Two images with panoptic PNGs: segments of ids 1..3 (RGB-encoded) including a crowd one."""
    annotations = []
    for image_id, (h, w) in enumerate(SIZES[:2]):
        ids = np.zeros((h, w), dtype=np.int64)
        ids[: h // 2, : w // 2] = 1
        ids[h // 2 :, :] = 2 + 256  # an id that needs two colour channels
        ids[: h // 4, w // 2 :] = 3
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"{image_id}.png")
        segments = [
            {"id": 1, "category_id": 7, "iscrowd": 0, "area": float((ids == 1).sum())},
            {"id": 258, "category_id": 40, "iscrowd": 0, "area": float((ids == 258).sum())},
            {"id": 3, "category_id": 7, "iscrowd": 1, "area": float((ids == 3).sum())},
        ]
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": segments})
    return annotations


def test_panoptic_annotations_equal_transformers(tmp_path):
    annotations = panoptic_case(tmp_path)
    options = {"format": "coco_panoptic"}
    ours = DetrImageProcessor(**options)(images(sizes=SIZES[:2]), annotations=annotations, masks_path=tmp_path)
    theirs = TheirProcessor(**options)(
        images(sizes=SIZES[:2]), annotations=annotations, masks_path=tmp_path, return_tensors="pt"
    )
    assert_same(ours, theirs)
    assert ours["labels"][0]["masks"].shape[0] == 3 and ours["labels"][0]["iscrowd"].tolist() == [0, 0, 1]


def test_bad_annotations_are_named(tmp_path):
    processor = DetrImageProcessor()
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 annotation\(s\)"):
        processor(images()[:2], annotations=detection_annotations()[:1])
    with pytest.raises(ValueError, match=r"annotations\[0\] for format 'coco_detection' needs"):
        processor(images()[:1], annotations=[{"image_id": 1}])
    annotations = panoptic_case(tmp_path)
    (tmp_path / "1.png").unlink()
    with pytest.raises(ValueError, match=r"panoptic PNG .*1.png \(image id 1\) does not exist"):
        DetrImageProcessor(format="coco_panoptic")(
            images(sizes=SIZES[:2]), annotations=annotations, masks_path=tmp_path
        )


def test_configuration_round_trips_and_reads_transformers(tmp_path):
    processor = DetrImageProcessor(size={"shortest_edge": 512, "longest_edge": 900}, do_pad=False)
    processor.save_pretrained(tmp_path / "ours")
    again = DetrImageProcessor.from_pretrained(tmp_path / "ours")
    assert again.to_dict() == processor.to_dict()
    theirs = TheirProcessor(size={"shortest_edge": 512, "longest_edge": 900}, resample=3)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = DetrImageProcessor.from_pretrained(tmp_path / "theirs")
    assert loaded.size == {"shortest_edge": 512, "longest_edge": 900} and loaded.resample == 3
    assert_same(loaded(images()), theirs(images(), return_tensors="pt"))
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"max_size": 1000, "size": 600, "pad_and_return_pixel_mask": False}))
    old = DetrImageProcessor.from_pretrained(legacy)  # a transformers v4-era file
    assert old.size == {"shortest_edge": 600, "longest_edge": 1000} and not old.do_pad


def test_evaluation_uses_the_same_resize_and_normalization():
    image = images(sizes=[(300, 500)])[0]
    target = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.int64)}
    pixels, _ = eval_transforms(400, 600)(image, target, np.random.default_rng(0))
    processed = DetrImageProcessor(size={"shortest_edge": 400, "longest_edge": 600})(image)["pixel_values"][0]
    assert torch.equal(pixels, processed)


def random_outputs(batch=2, queries=9, classes=5, size=(12, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes + 1, generator=generator) * 3
    boxes = torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25
    masks = torch.randn(batch, queries, *size, generator=generator) * 4
    return SimpleNamespace(logits=logits, pred_boxes=boxes, pred_masks=masks)


def test_post_processing_equals_transformers():
    outputs = random_outputs()
    ours, theirs = DetrImageProcessor(), TheirProcessor()
    sizes = [(30, 40), (25, 17)]
    for mine, reference in zip(ours.post_process_object_detection(outputs, 0.3, sizes),
                               theirs.post_process_object_detection(outputs, 0.3, sizes)):  # fmt: skip
        for key in reference:
            torch.testing.assert_close(mine[key], reference[key])
    for mine, reference in zip(ours.post_process_semantic_segmentation(outputs, sizes),
                               theirs.post_process_semantic_segmentation(outputs, sizes)):  # fmt: skip
        assert torch.equal(mine, reference)
    for target_sizes in (None, sizes):
        for mine, reference in zip(
            ours.post_process_instance_segmentation(outputs, 0.3, target_sizes=target_sizes),
            theirs.post_process_instance_segmentation(outputs, 0.3, target_sizes=target_sizes),
        ):
            assert torch.equal(mine["segmentation"], reference["segmentation"])
            assert mine["segments_info"] == reference["segments_info"]
        for mine, reference in zip(
            ours.post_process_panoptic_segmentation(outputs, 0.3, target_sizes=target_sizes, label_ids_to_fuse=set()),
            theirs.post_process_panoptic_segmentation(outputs, 0.3, target_sizes=target_sizes, label_ids_to_fuse=set()),
        ):
            assert torch.equal(mine["segmentation"], reference["segmentation"])
            assert mine["segments_info"] == reference["segments_info"]


def trained_like_outputs(batch=2, queries=40, classes=20, size=(50, 67), seed=0):
    """Outputs like a trained model's: a third of the queries confident in one class, their masks discs."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes + 1, generator=generator)
    logits[:, : queries // 3].scatter_add_(-1, (torch.arange(queries // 3) % classes).expand(batch, -1)[..., None],
                                           torch.full((batch, queries // 3, 1), 8.0))  # fmt: skip
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    centre = torch.rand(batch, queries, 2, 1, 1, generator=generator) * torch.tensor(size).view(2, 1, 1)
    radius = 3 + torch.rand(batch, queries, 1, 1, generator=generator) * 10
    distance = ((rows - centre[:, :, 0]) ** 2 + (cols - centre[:, :, 1]) ** 2).sqrt()
    return SimpleNamespace(logits=logits, pred_boxes=torch.rand(batch, queries, 4, generator=generator),
                           pred_masks=(radius - distance) / 2)  # fmt: skip


def test_segmentation_at_image_size_equals_transformers():
    """Upsampled 4x to odd image sizes, where the maps are decided at the mask resolution and upsampled along the
    boundaries only: the same maps and segments as transformers', which upsamples every map."""
    outputs = trained_like_outputs()
    ours, theirs = DetrImageProcessor(), TheirProcessor()
    sizes = [(200, 267), (157, 301)]
    for mine, reference in zip(ours.post_process_semantic_segmentation(outputs, sizes),
                               theirs.post_process_semantic_segmentation(outputs, sizes)):  # fmt: skip
        assert torch.equal(mine, reference)
    for mode, kwargs in (("instance", {}), ("panoptic", {"label_ids_to_fuse": set()})):
        mine = getattr(ours, f"post_process_{mode}_segmentation")(outputs, 0.5, target_sizes=sizes, **kwargs)
        reference = getattr(theirs, f"post_process_{mode}_segmentation")(outputs, 0.5, target_sizes=sizes, **kwargs)
        for a, b in zip(mine, reference):
            assert len(a["segments_info"]) >= 5 and a["segments_info"] == b["segments_info"]
            assert torch.equal(a["segmentation"], b["segmentation"])


def test_fused_segments_keep_unique_ids_and_rle_is_cocos():
    from pycocotools import mask as coco_mask

    outputs = random_outputs(batch=1, queries=12, seed=3)
    outputs.logits[..., -1] -= 6  # real classes win
    outputs.pred_masks.fill_(-8.0)
    for query in range(12):  # each query's mask is its own row: every one makes a segment
        outputs.pred_masks[0, query, query] = 8.0
    result = DetrImageProcessor().post_process_panoptic_segmentation(outputs, 0.1, label_ids_to_fuse={0, 1, 2})[0]
    ids = [segment["id"] for segment in result["segments_info"]]
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == list(range(1, len(first_seen) + 1)) and len(first_seen) < len(ids)  # some fused
    owners = {}
    for segment in result["segments_info"]:  # one label per id: a new segment never reuses a fused one's id
        assert owners.setdefault(segment["id"], segment["label_id"]) == segment["label_id"]
    instances = DetrImageProcessor().post_process_instance_segmentation(outputs, 0.1, return_coco_annotation=True)[0]
    plain = DetrImageProcessor().post_process_instance_segmentation(outputs, 0.1)[0]
    assert len(instances["segmentation"]) == len(plain["segments_info"]) > 0
    for rle, segment in zip(instances["segmentation"], plain["segments_info"]):
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), (plain["segmentation"] == segment["id"]).numpy())


def test_batches_reuse_host_memory_only_when_nothing_holds_it():
    """The CPU batch buffers are reused once the last batch is dropped, never while a batch or a view of it lives."""
    rng = np.random.default_rng(0)
    first = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)]
    second = [rng.integers(0, 256, (44, 52, 3), dtype=np.uint8)]
    processor = DetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 64})
    kept = processor(first)
    expected = {key: kept[key].clone() for key in ("pixel_values", "pixel_mask")}
    view = processor(second)["pixel_values"][0]  # only a view of the batch survives
    again = processor(first)  # may not reuse the memory `kept` or `view` live in
    for key in expected:
        assert torch.equal(kept[key], expected[key]) and torch.equal(again[key], expected[key])
    second_pixels = TheirProcessor(size={"shortest_edge": 48, "longest_edge": 64})(second, return_tensors="pt")
    assert torch.equal(view, second_pixels["pixel_values"][0])
    pointer = again["pixel_values"].data_ptr()
    del again
    assert processor(first)["pixel_values"].data_ptr() == pointer  # dropped: its memory serves the next batch
