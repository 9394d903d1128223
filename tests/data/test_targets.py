"""pad_targets: transformers-style labels to fixed-shape padded tensors."""

import pytest
import torch

from detr_fast import pad_targets
from detr_fast.data.targets import PAD_BOX, is_padded


def test_pads_to_the_longest_image():
    labels = [
        {"class_labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.2, 0.1, 0.1]])},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"class_labels": torch.tensor([7]), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.3]])},
    ]
    padded = pad_targets(labels)
    assert is_padded(padded) and not is_padded(labels)
    assert padded["class_labels"].tolist() == [[3, 1], [0, 0], [7, 0]]
    assert padded["mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(padded["boxes"][0], labels[0]["boxes"])
    assert padded["boxes"][1].tolist() == [list(PAD_BOX)] * 2


def test_fixed_size_and_empty_batch():
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}]
    assert pad_targets(labels, max_targets=5)["mask"].shape == (1, 5)
    empty = pad_targets([{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert empty["mask"].shape == (1, 1) and not empty["mask"].any()


@pytest.mark.parametrize(
    "labels,kwargs,match",
    [
        ([{"boxes": torch.rand(1, 4)}], {}, "has no 'class_labels'"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 3)}], {}, r"expected \[M, 4\]"),
        ([{"class_labels": torch.tensor([1, 2]), "boxes": torch.rand(1, 4)}], {}, "one label per box"),
        ([{"class_labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4)}], {"max_targets": 1}, "has 2 targets"),
        (
            [{"class_labels": torch.tensor([1, 7]), "boxes": torch.rand(2, 4)}],
            {"num_classes": 7},
            r"\[1, 7\]; every label must be in \[0, 7\)",
        ),
        ([{"class_labels": torch.tensor([-1]), "boxes": torch.rand(1, 4)}], {"num_classes": 7}, "must be in"),
    ],
)
def test_bad_labels_are_named(labels, kwargs, match):
    with pytest.raises((KeyError, ValueError), match=match):
        pad_targets(labels, **kwargs)


BOX = [0.5, 0.5, 0.2, 0.2]


@pytest.mark.parametrize(
    "boxes,match",
    [
        ([[120.0, 80.0, 40.0, 30.0]], r"labels\[1\]\['boxes'\] row 0 is .*look like pixel coordinates"),
        ([BOX, [0.5, float("nan"), 0.2, 0.2]], r"row 1 is \[0.5, nan, 0.2, 0.2\]: boxes must be normalized"),
        ([[0.5, 0.5, -0.1, 0.2]], "positive width and height"),
        ([[0.5, 0.5, 0.0, 0.2]], "positive width and height"),
        ([[1.2, 0.5, 0.2, 0.2]], r"finite values in \[0, 1\]"),
    ],
)
def test_boxes_must_be_normalized_cxcywh(boxes, match):
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([BOX])}]
    labels.append({"class_labels": torch.ones(len(boxes), dtype=torch.long), "boxes": torch.tensor(boxes)})
    with pytest.raises(ValueError, match=match):
        pad_targets(labels)
    labels[1]["boxes"] = torch.tensor([[0.5, 0.5, 0.2, 1.00005]] * len(boxes))  # rounding past 1 is tolerated
    assert pad_targets(labels)["mask"].sum() == 1 + len(boxes)


def test_targets_must_be_dicts_of_integer_labels():
    with pytest.raises(TypeError, match=r"labels\[0\] must be a dict"):
        pad_targets([torch.tensor([BOX])])
    with pytest.raises(ValueError, match=r"'class_labels'\] must hold integer class ids"):
        pad_targets([{"class_labels": torch.tensor([1.0]), "boxes": torch.tensor([BOX])}])
