"""Padded targets: the fixed-shape form of transformers-style labels that matching and loss take."""

from collections.abc import Mapping, Sequence

import torch

# Padded slots hold this label and box. The box is valid (positive size), so costs and losses computed on padded
# slots stay finite before they are masked out or weighted by 0.
PAD_LABEL = 0
PAD_BOX = (0.5, 0.5, 1.0, 1.0)


def pad_targets(
    labels: Sequence[Mapping[str, torch.Tensor]],
    max_targets: int | None = None,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack per-image targets into padded tensors.

    Args:
        labels: one dict per image with "class_labels" [M_i] int and "boxes" [M_i, 4] cxcywh normalized
            (transformers' label format; extra keys are ignored).
        max_targets: pad to this many slots (a fixed M keeps shapes static across steps); default max_i M_i, and
            at least 1 so that gathers over the target dim stay valid when no image has a target.
        device: where the result lives; default the device of the first image's boxes.
        num_classes: when given, every class label must lie in [0, num_classes) (checked here, on the host, so
            that a bad label is an error naming its image instead of an out-of-range gather in the loss).
    Returns:
        {"class_labels": [B, M] int64, "boxes": [B, M, 4] float32, "mask": [B, M] bool (True = real target)}.
    """
    if isinstance(labels, Mapping) or not isinstance(labels, Sequence):
        raise TypeError(f"pad_targets: labels must be a list of per-image dicts, got {type(labels).__name__}")
    counts = []
    for i, target in enumerate(labels):
        for key in ("class_labels", "boxes"):
            if key not in target:
                raise KeyError(f"pad_targets: labels[{i}] has no {key!r} (keys: {sorted(target)})")
        boxes, classes = torch.as_tensor(target["boxes"]), torch.as_tensor(target["class_labels"])
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"pad_targets: labels[{i}]['boxes'] has shape {tuple(boxes.shape)}, expected [M, 4]")
        if classes.shape != boxes.shape[:1]:
            raise ValueError(
                f"pad_targets: labels[{i}]['class_labels'] has shape {tuple(classes.shape)}, expected "
                f"[{boxes.shape[0]}] (one label per box)"
            )
        if (
            num_classes is not None
            and classes.numel()
            and not (0 <= int(classes.min()) and int(classes.max()) < num_classes)
        ):
            raise ValueError(
                f"pad_targets: labels[{i}]['class_labels'] holds {sorted(set(classes.tolist()))}; every label must "
                f"be in [0, {num_classes}) (num_labels of the model)"
            )
        counts.append(boxes.shape[0])
    longest = max(counts, default=0)
    if max_targets is None:
        max_targets = max(longest, 1)
    elif max_targets < 1:
        raise ValueError(f"pad_targets: max_targets must be at least 1, got {max_targets}")
    elif max_targets < longest:
        raise ValueError(
            f"pad_targets: max_targets={max_targets} but image {counts.index(longest)} has {longest} targets"
        )
    if device is None:
        device = torch.as_tensor(labels[0]["boxes"]).device if labels else "cpu"
    batch = len(labels)
    class_labels = torch.full((batch, max_targets), PAD_LABEL, dtype=torch.int64, device=device)
    boxes = torch.tensor(PAD_BOX, dtype=torch.float32, device=device).repeat(batch, max_targets, 1)
    mask = torch.zeros((batch, max_targets), dtype=torch.bool, device=device)
    for i, (target, count) in enumerate(zip(labels, counts)):
        class_labels[i, :count] = torch.as_tensor(target["class_labels"], device=device)
        boxes[i, :count] = torch.as_tensor(target["boxes"], device=device, dtype=torch.float32)
        mask[i, :count] = True
    return {"class_labels": class_labels, "boxes": boxes, "mask": mask}


def is_padded(labels: object) -> bool:
    """True for the mapping `pad_targets` returns, False for a list of per-image dicts."""
    return isinstance(labels, Mapping) and {"class_labels", "boxes", "mask"} <= set(labels)
