"""The data of a training run: the datasets of its config, the batch order (a function of the seed and the step
alone, so a resumed run sees exactly the batches the uninterrupted one would) and the loader."""

from __future__ import annotations

import os

import torch

from ..data.collate import collate
from ..data.datasets import CocoDetection, CocoImages, CocoPanoptic
from ..data.synthetic import SyntheticSpec, panoptic_split_paths, write_coco, write_coco_panoptic
from ..data.transforms import eval_transforms, train_transforms
from ..runtime import barrier, is_main_process
from .config import TrainConfig, validate


def build_datasets(cfg: TrainConfig) -> tuple[CocoImages, CocoImages | None]:
    """(train, val) datasets of a run (val None when the run does not evaluate and names no validation set): COCO
    detection sets (with instance masks for task "instance") or COCO panoptic sets (task "panoptic"); writes the
    synthetic set first when cfg.dataset is "synthetic". The config is validated first (config.validate)."""
    validate(cfg)
    panoptic = cfg.task == "panoptic"
    if cfg.dataset == "synthetic":
        root = cfg.data_dir or os.path.join(cfg.output_dir, "data")
        spec = SyntheticSpec(**cfg.synthetic_spec)
        if panoptic:
            splits = [panoptic_split_paths(root, split) for split in ("train", "val")]
            writer = write_coco_panoptic
        else:
            splits = [(os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json"), None)
                      for split in ("train", "val")]  # fmt: skip
            writer = write_coco
        if is_main_process():  # one writer; the others wait at the barrier
            writer(root, "train", cfg.synthetic_train_images, cfg.seed, spec)
            writer(root, "val", cfg.synthetic_val_images, cfg.seed + 1, spec)
        barrier()
    else:
        splits = [
            (cfg.train_images, cfg.train_annotations, cfg.train_panoptic_pngs),
            (cfg.val_images, cfg.val_annotations, cfg.val_panoptic_pngs),
        ]
    train_tf = train_transforms(cfg.scales, cfg.max_size, cfg.crop_resize, cfg.crop_size, cfg.flip)
    val_tf = eval_transforms(cfg.eval_size, cfg.eval_max_size) if cfg.eval_size else None

    def dataset(split, transforms):
        images, annotations, pngs = split
        if panoptic:
            return CocoPanoptic(images, annotations, pngs, transforms, on_bad=cfg.on_bad, seed=cfg.seed)
        return CocoDetection(images, annotations, transforms, on_bad=cfg.on_bad, seed=cfg.seed,
                             masks=cfg.task == "instance")  # fmt: skip

    train_set = dataset(splits[0], train_tf)
    if splits[1][0] is None:
        return train_set, None
    val_set = dataset(splits[1], val_tf)
    if train_set.label_to_category_id != val_set.label_to_category_id:
        raise ValueError(
            f"the categories of {splits[0][1]} and {splits[1][1]} differ: "
            f"{train_set.label_to_category_id} vs {val_set.label_to_category_id}"
        )
    return train_set, val_set


class StepBatchSampler(torch.utils.data.Sampler):
    """The batches of one epoch for one process: a permutation seeded by (seed, epoch), cut into global batches of
    batch_size * world_size images (the last incomplete one dropped), of which this rank takes its slice.
    `set_epoch(epoch, start)` starts at batch `start`, so a resumed run continues mid-epoch."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.steps_per_epoch = num_images // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_images} training images are fewer than one global batch "
                f"({batch_size} per process x {world_size} processes)"
            )
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_images, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start, self.steps_per_epoch):
            first = step * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def build_loader(dataset, batch_sampler, cfg: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    def collate_fn(samples):
        return collate(samples, max_targets=cfg.max_targets)

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # A private generator: creating a loader iterator must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
