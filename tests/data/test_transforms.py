"""DETR's transforms on uint8 image tensors: boxes follow the pixels through flip, resize and crop; sizes follow the
image processor's rule; the final boxes are normalized cxcywh; randomness comes only from the rng passed in."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from detr_fast.data.transforms import (
    RandomSizeCrop,
    ToModelInput,
    crop,
    eval_transforms,
    hflip,
    resize,
    scaled_size,
    train_transforms,
)
from detr_fast.processing.transforms import IMAGENET_MEAN, IMAGENET_STD, to_uint8_tensor

COCO_SCALES = list(range(480, 801, 32))


def drawn(width, height, boxes):
    """A black uint8 [3, H, W] image with a white filled rectangle per xyxy box, and its target."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
    image = to_uint8_tensor(image).contiguous()
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "class_labels": torch.arange(len(boxes)),
        "image_id": 9,
    }
    return image, target


def white_extent(image):
    """xyxy of the white pixels of a [3, H, W] image."""
    ys, xs = np.nonzero(image[0].numpy() > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize(
    "size_in,size,max_size,expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((100, 1000), 800, 1333, (133, 1333)),  # DETR's own rule: (133, 1330)
        ((128, 96), 96, None, (128, 96)),
        ((81, 20), 16, 48, (48, 12)),
        ((27, 11), 24, 48, (48, 20)),  # DETR's own rule: (49, 20), past max_size
    ],
)
def test_scaled_size_follows_the_image_processor(size_in, size, max_size, expected):
    assert scaled_size(*size_in, size, max_size) == expected


def test_flip_mirrors_the_boxes_with_the_pixels():
    image, target = drawn(50, 30, [(5, 4, 20, 14)])
    flipped, out = hflip(image, target)
    assert out["boxes"].tolist() == [[30, 4, 45, 14]] == [white_extent(flipped)]
    back, twice = hflip(flipped, out)
    assert torch.equal(back, image) and torch.equal(twice["boxes"], target["boxes"])


def test_resize_scales_the_boxes_with_the_pixels():
    image, target = drawn(60, 40, [(10, 8, 30, 24)])
    resized, out = resize(image, target, size=80)
    assert resized.shape == (3, 80, 120)
    assert out["boxes"].tolist() == [[20, 16, 60, 48]]
    assert np.allclose(white_extent(resized), out["boxes"][0].tolist(), atol=1)


def test_crop_clips_boxes_and_drops_those_left_empty():
    image, target = drawn(60, 40, [(10, 8, 30, 24), (40, 30, 55, 38), (0, 0, 5, 5)])
    target["area"] = torch.tensor([320.0, 120.0, 25.0])
    cropped, out = crop(image, target, top=5, left=8, height=28, width=40)
    assert cropped.shape == (3, 28, 40)
    assert out["boxes"].tolist() == [[2, 3, 22, 19], [32, 25, 40, 28]]  # the third box lies outside the crop
    assert out["class_labels"].tolist() == [0, 1] and out["area"].tolist() == [320.0, 120.0]
    assert out["image_id"] == 9


def test_random_size_crop_stays_within_its_bounds():
    image, target = drawn(100, 80, [(10, 10, 90, 70)])
    rng = np.random.default_rng(0)
    for _ in range(20):
        cropped, _ = RandomSizeCrop(30, 60)(image, target, rng)
        assert 30 <= cropped.shape[2] <= 60 and 30 <= cropped.shape[1] <= 60


def test_to_model_input_normalizes_image_and_boxes():
    image, target = drawn(40, 20, [(10, 5, 30, 15)])
    tensor, out = ToModelInput()(image, target, np.random.default_rng(0))
    assert tensor.shape == (3, 20, 40) and out["size"] == (20, 40)
    assert out["boxes"].tolist() == [[0.5, 0.5, 0.5, 0.5]]
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(tensor[:, 10, 20], white) and torch.allclose(tensor[:, 0, 0], black)


def test_coco_training_sizes_and_determinism():
    transforms = train_transforms(COCO_SCALES, 1333, (400, 500, 600), (384, 600))
    image, target = drawn(640, 480, [(100, 100, 300, 200), (400, 300, 600, 460)])
    sizes = set()
    for seed in range(12):
        tensor, out = transforms(image, target, np.random.default_rng(seed))
        again, out_again = transforms(image, target, np.random.default_rng(seed))
        assert torch.equal(tensor, again) and torch.equal(out["boxes"], out_again["boxes"])
        height, width = tensor.shape[1:]
        assert min(height, width) in COCO_SCALES or max(height, width) == 1333
        assert max(height, width) <= 1333
        sizes.add((height, width))
    assert len(sizes) > 3  # multi-scale: the seed changes the size


def test_eval_transform_is_deterministic_resize():
    image, target = drawn(640, 480, [(100, 100, 300, 200)])
    tensor, out = eval_transforms(800, 1333)(image, target, np.random.default_rng(1))
    assert tensor.shape == (3, 800, 1066)
    assert torch.allclose(out["boxes"], torch.tensor([[200 / 640, 150 / 480, 200 / 640, 100 / 480]]), atol=1e-6)


def test_training_transform_keeps_boxes_valid():
    hypothesis = pytest.importorskip("hypothesis")  # the GPU machine has none; the rest of the file runs there
    st = hypothesis.strategies

    @hypothesis.given(
        seed=st.integers(0, 2**31),
        width=st.integers(20, 200),
        height=st.integers(20, 200),
        box=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
    )
    def check(seed, width, height, box):
        x0, y0 = int(box[0] * width), int(box[1] * height)
        x1, y1 = min(width, x0 + 1 + int(box[2] * width)), min(height, y0 + 1 + int(box[3] * height))
        image, target = drawn(width, height, [(x0, y0, x1, y1)])
        transforms = train_transforms([16, 24, 32], 48, None, (10, 30))
        tensor, out = transforms(image, target, np.random.default_rng(seed))
        boxes = out["boxes"]
        assert boxes.shape[0] == out["class_labels"].shape[0] <= 1
        assert tensor.shape[1:] == out["size"]
        if boxes.numel():
            cx, cy, w, h = boxes[0].tolist()
            assert w > 0 and h > 0
            assert -1e-6 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6 and -1e-6 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6

    check()
