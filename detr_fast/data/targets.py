"""Padded targets: the fixed-shape form of transformers-style labels that matching and loss take."""

from collections.abc import Mapping, Sequence

import torch

# Padded slots hold this label and box. The box is valid (positive size), so costs and losses computed on padded
# slots stay finite before they are masked out or weighted by 0.
PAD_LABEL = 0
PAD_BOX = (0.5, 0.5, 1.0, 1.0)
BOX_TOLERANCE = 1e-4  # normalized coordinates may pass [0, 1] by this much (rounding)


def pad_targets(
    labels: Sequence[Mapping[str, torch.Tensor]],
    max_targets: int | None = None,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    mask_size: tuple[int, int] | None = None,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """Stack per-image targets into padded tensors.

    Args:
        labels: one dict per image with "class_labels" [M_i] int and "boxes" [M_i, 4] cxcywh normalized
            (transformers' label format; extra keys are ignored), each checked on the host (check_target).
        max_targets: pad to this many slots (a fixed M keeps shapes static across steps); default max_i M_i, and
            at least 1 so that gathers over the target dim stay valid when no image has a target.
        device: where the result lives; default the device of the first image's boxes.
        num_classes: when given, every class label must lie in [0, num_classes) (checked here, on the host, so
            that a bad label is an error naming its image instead of an out-of-range gather in the loss).
        mask_size: (H, W) to pad the masks to, the padded images' size (the collate's); default the largest mask.
        check: check each target on the host (check_target: it reads the boxes back, a sync on a GPU); False takes
            the targets as they are and their counts from the shapes (a loss inside a training step).
    Returns:
        {"class_labels": [B, M] int64, "boxes": [B, M, 4] float32, "mask": [B, M] bool (True = real target)}, and
        when the labels have "masks" ([M_i, H_i, W_i] binary, bool or 0/1 numbers): "masks" [B, M, H, W] bool,
        zero-padded to the largest H and W and in the padded slots (as transformers' loss pads them).
    """
    if isinstance(labels, Mapping) or not isinstance(labels, Sequence):
        raise TypeError(f"pad_targets: labels must be a list of per-image dicts, got {type(labels).__name__}")
    if check:
        counts = [check_target(i, target, num_classes) for i, target in enumerate(labels)]
    else:
        counts = [len(target["boxes"]) for target in labels]
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
    padded = {"class_labels": class_labels, "boxes": boxes, "mask": mask}
    if any("masks" in target for target in labels):
        padded["masks"] = pad_masks(labels, counts, max_targets, device, mask_size)
    return padded


def pad_masks(
    labels: Sequence[Mapping[str, torch.Tensor]],
    counts: list[int],
    max_targets: int,
    device: torch.device | str,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The labels' "masks" ([M_i, H_i, W_i] each) stacked into [B, M, H, W] bool, zero-padded to `size` (default the
    largest); ValueError naming the image when one has no masks, a mask count that differs from its boxes', values
    that are not binary or a mask larger than `size`."""
    masks = []
    for i, (target, count) in enumerate(zip(labels, counts)):
        where = f"pad_targets: labels[{i}]['masks']"
        if "masks" not in target:
            raise ValueError(f"pad_targets: labels[{i}] has no 'masks' but other images do: give every image its masks")
        value = torch.as_tensor(target["masks"])
        if value.dim() != 3 or value.shape[0] != count:
            raise ValueError(f"{where} has shape {tuple(value.shape)}, expected [{count}, H, W] (one mask per box)")
        if value.dtype != torch.bool:
            if value.is_complex() or bool(((value != 0) & (value != 1)).any()):
                raise ValueError(f"{where} must be binary (bool, or numbers 0 and 1), got {value.dtype} values")
            value = value != 0
        masks.append(value)
    height, width = size if size is not None else (max(m.shape[1] for m in masks), max(m.shape[2] for m in masks))
    for i, value in enumerate(masks):
        if value.shape[1] > height or value.shape[2] > width:
            raise ValueError(
                f"pad_targets: labels[{i}]['masks'] are {value.shape[1]}x{value.shape[2]}, larger than the padded "
                f"size {height}x{width}"
            )
    out = torch.zeros((len(masks), max_targets, height, width), dtype=torch.bool, device=device)
    for i, value in enumerate(masks):
        out[i, : value.shape[0], : value.shape[1], : value.shape[2]] = value.to(device)
    return out


def check_target(index: int, target: object, num_classes: int | None = None) -> int:
    """Check the target of image `index` (transformers' label format) on the host; return its number of boxes.

    Boxes must be normalized cxcywh: four finite values in [0, 1] (a small tolerance for rounding) with positive
    width and height; with `num_classes`, every class label in [0, num_classes). ValueError (TypeError for what is
    not a dict) naming the image, the field and the first offending row; boxes that look like pixel coordinates get
    a hint.
    """
    where = f"pad_targets: labels[{index}]"
    if not isinstance(target, Mapping):
        raise TypeError(f"{where} must be a dict with 'class_labels' and 'boxes', got {type(target).__name__}")
    for key in ("class_labels", "boxes"):
        if key not in target:
            raise ValueError(f"{where} has no {key!r} (keys: {sorted(target)})")
    boxes, classes = torch.as_tensor(target["boxes"]), torch.as_tensor(target["class_labels"])
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{where}['boxes'] has shape {tuple(boxes.shape)}, expected [M, 4] (cxcywh)")
    if classes.shape != boxes.shape[:1]:
        raise ValueError(
            f"{where}['class_labels'] has shape {tuple(classes.shape)}, expected [{boxes.shape[0]}] (one label per box)"
        )
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"{where}['class_labels'] must hold integer class ids, got {classes.dtype}")
    if boxes.numel():
        cpu = boxes.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(cpu).all(-1) | (cpu < -BOX_TOLERANCE).any(-1) | (cpu > 1 + BOX_TOLERANCE).any(-1)
        bad |= (cpu[:, 2:] <= 0).any(-1)
        if bad.any():
            row = int(bad.nonzero()[0])
            hint = ""
            if torch.isfinite(cpu).all() and cpu.max() > 1 + BOX_TOLERANCE:
                hint = (
                    "; these look like pixel coordinates: DETR takes boxes normalized by the image size "
                    "(cx and w divided by the width, cy and h by the height)"
                )
            raise ValueError(
                f"{where}['boxes'] row {row} is {[round(v, 6) for v in cpu[row].tolist()]}: boxes must be "
                "normalized (cx, cy, w, h) with finite values in [0, 1] and a positive width and height "
                f"({int(bad.sum())} bad row(s)){hint}"
            )
    if num_classes is not None and classes.numel():
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{where}['class_labels'] holds {sorted(set(classes.tolist()))}; every label must be in "
                f"[0, {num_classes}) (num_labels of the model)"
            )
    return boxes.shape[0]


def is_padded(labels: object) -> bool:
    """True for the mapping `pad_targets` returns, False for a list of per-image dicts."""
    return isinstance(labels, Mapping) and {"class_labels", "boxes", "mask"} <= set(labels)
