"""Benchmark of DETR segmentation: detr_fast's DetrForSegmentation against transformers' with the same weights and
batch: the training step and the peak activation memory of the mask head and the mask loss.

Rows:
- "step": forward with labels (detection and mask losses) + backward of the whole model; both models train the same
  parameters (DETR freezes the ResNet stem and layer1; transformers does only for a pretrained backbone).
- "peak mask head", "peak mask loss", "peak mask head + loss": the peak activation memory of forward + backward of
  that part alone, each measured in a fresh process once the inputs exist (common.peak_memory_mib: on the CPU the
  peak resident set with glibc's mmap threshold fixed, on CUDA the peak allocation). The inputs are random tensors
  of the shapes the model gives the part: the stride-32 features, the attention maps and the stride-16/8/4 backbone
  levels (mask head), the mask logits, an assignment and the target masks (loss; detr_fast takes them padded as its
  collate makes them, transformers as a list of float masks, its label format, which its loss pads itself).
The mask loss and the mask head's fusion stage alone: bench/mask_loss.py, bench/upsample_add.py.

Cases: on the CPU, "small" (resnet18, d_model 64, 100 queries as DETR, 2 images of 128 x 160) and "mid" (d_model 128,
100 queries, 2 images of 256 x 320), fp32; on CUDA, COCO scale: DETR-R50 (d_model 256, 6+6 layers), 100 queries,
2 images of 800 x 1066, fp32.

    python bench/segmentation.py --device cpu --out bench/results
    python bench/segmentation.py --device cuda --out DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    parser,
    peak_memory_mib,
    record_end_load,
    report_targets,
    row_of,
    speedup_line,
    time_all,
    verdict,
    worker_peak_mib,
    write_results,
)

from detr_fast import DetrForSegmentation, ops, pad_targets  # noqa: E402

TARGETS = (
    "Targets (side by side in one run on the CPU): the segmentation step >= 1.5x faster than transformers'; the "
    "peak activation memory of the mask head + loss <= 1/3 of transformers'."
)
PARTS = ("mask head", "mask loss", "mask head + loss")
IMPLS = ("detr_fast", "transformers")


def cases(device: str, quick: bool) -> list[dict]:
    """Each case: its name, transformers' config kwargs, the batch size and the (padded) image size."""
    common = dict(use_timm_backbone=True, use_pretrained_backbone=False, num_queries=100, auxiliary_loss=True)
    common.update(encoder_attention_heads=8, decoder_attention_heads=8, dropout=0.0, num_labels=20)
    if device == "cuda":
        coco = dict(common, backbone="resnet50", num_labels=250)
        return [dict(name="COCO R50 B=2 800x1066", config=coco, batch=2, size=(800, 1066))]
    small = dict(common, backbone="resnet18", d_model=64, encoder_layers=2, decoder_layers=2)
    small.update(encoder_ffn_dim=128, decoder_ffn_dim=128)
    mid = dict(common, backbone="resnet18", d_model=128, encoder_layers=2, decoder_layers=2)
    mid.update(encoder_ffn_dim=256, decoder_ffn_dim=256)
    found = [
        dict(name="small d64 Q100 B=2 128x160", config=small, batch=2, size=(128, 160)),
        dict(name="mid d128 Q100 B=2 256x320", config=mid, batch=2, size=(256, 320)),
    ]
    return found[:1] if quick else found


def build(case: dict, device: str):
    """(detr_fast's model, transformers' model) with the same weights and trainable parameters."""
    import transformers

    torch.manual_seed(0)
    theirs = transformers.DetrForSegmentation(transformers.DetrConfig(**case["config"]))
    ours = DetrForSegmentation.from_transformers(theirs)
    for (_, mine), (_, their) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        their.requires_grad_(mine.requires_grad)
    return ours.to(device).train(), theirs.to(device).train()


def labels_for(case: dict, device: str) -> list[dict]:
    """Per image 3-7 objects: classes, boxes and binary masks of the padded size."""
    generator = torch.Generator().manual_seed(1)
    labels = []
    for image in range(case["batch"]):
        count = 3 + 4 * image // max(case["batch"] - 1, 1)
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, case["config"]["num_labels"], (count,), generator=generator),
                "boxes": torch.cat([centres, sides], -1),
                "masks": torch.rand(count, *case["size"], generator=generator) < 0.4,
            }
        )
    return [{k: v.to(device) for k, v in target.items()} for target in labels]


def their_labels(labels: list[dict]) -> list[dict]:
    """transformers' label format: float masks."""
    return [{**target, "masks": target["masks"].float()} for target in labels]


def step_rows(case: dict, device: str, repeats: int) -> list[dict]:
    """Forward with labels + backward of both models on the same batch."""
    ours, theirs = build(case, device)
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(case["batch"], 3, *case["size"], generator=generator).to(device)
    pixel_mask = torch.ones(case["batch"], *case["size"], dtype=torch.int64, device=device)
    labels = labels_for(case, device)
    padded = pad_targets(labels, device=device)
    theirs_labels = their_labels(labels)
    losses = {}

    def ours_step():
        loss = ours(pixel_values, pixel_mask, labels=padded).loss
        loss.backward()
        ours.zero_grad(set_to_none=True)
        losses["detr_fast"] = float(loss.detach())

    def theirs_step():
        loss = theirs(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=theirs_labels).loss
        loss.backward()
        theirs.zero_grad(set_to_none=True)
        losses["transformers"] = float(loss.detach())

    timings = time_all({"detr_fast": ours_step, "transformers": theirs_step}, device, repeats=repeats)
    return [
        {"case": case["name"], "part": "step", "impl": impl, **timings[impl].columns(), "loss": losses[impl]}
        for impl in IMPLS
    ]


# ------------------------------------------------------------------------------------------------ peak memory


def part_inputs(case: dict, ours: DetrForSegmentation, device: str) -> dict:
    """Random inputs of the mask head and the loss in the shapes the model gives them."""
    generator = torch.Generator().manual_seed(3)
    config, batch, (height, width) = ours.config, case["batch"], case["size"]
    queries, heads = config.num_queries, config.encoder_attention_heads

    def side(stride):
        return -(-height // stride), -(-width // stride)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_()

    channels = ours.detr.model.backbone.channels  # strides 4, 8, 16, 32
    attention = torch.randn(batch, queries, heads * side(32)[0] * side(32)[1], generator=generator).softmax(-1)
    labels = labels_for(case, device)
    assignment = torch.full((batch, queries), -1, dtype=torch.int64)
    for image, target in enumerate(labels):
        assignment[image, torch.randperm(queries, generator=generator)[: len(target["boxes"])]] = torch.arange(
            len(target["boxes"])
        )
    return {
        "projected": leaf(batch, config.d_model, *side(32)),
        "attention": attention.view(batch, queries, heads, *side(32)).to(device).requires_grad_(),
        "fpn": [
            leaf(batch, channels[2], *side(16)),
            leaf(batch, channels[1], *side(8)),
            leaf(batch, channels[0], *side(4)),
        ],
        "pred_masks": leaf(batch, queries, *side(4)),
        "assignment": assignment.to(device),
        "padded_masks": pad_targets(labels, device=device)["masks"],
        "their_masks": their_labels(labels),
    }


def part_function(part: str, impl: str, models: tuple, inputs: dict):
    """forward + backward of `part` by `impl` on `inputs`."""
    from transformers.loss.loss_for_object_detection import ImageLoss

    ours, theirs = models
    num_boxes = float(sum(len(t["boxes"]) for t in inputs["their_masks"]))
    their_loss = ImageLoss(None, theirs.config.num_labels, 0.1, ["masks"])
    indices = [
        (torch.nonzero(row >= 0)[:, 0], row[row >= 0]) for row in inputs["assignment"]
    ]  # transformers' matcher output: (query indices, target indices) per image

    def head():
        if impl == "detr_fast":
            return ours.mask_head(inputs["projected"], inputs["attention"], inputs["fpn"])
        masks = theirs.mask_head(
            features=inputs["projected"], attention_masks=inputs["attention"], fpn_features=inputs["fpn"]
        )
        return masks.view(*inputs["attention"].shape[:2], *masks.shape[-2:])

    def loss(pred_masks):
        if impl == "detr_fast":
            focal, dice = ops.mask_loss(pred_masks, inputs["assignment"], inputs["padded_masks"])
            return (focal + dice) / num_boxes
        losses = their_loss.loss_masks({"pred_masks": pred_masks}, inputs["their_masks"], indices, num_boxes)
        return losses["loss_mask"] + losses["loss_dice"]

    def run():
        if part == "mask head":
            head().sum().backward()
        elif part == "mask loss":
            loss(inputs["pred_masks"]).backward()
        else:
            loss(head()).backward()

    return run


def measure_peak(case_index: int, part: str, impl: str, device: str) -> float:
    """The worker: MiB of activation memory at the peak of one forward + backward of `part` by `impl`."""
    torch.set_grad_enabled(True)
    case = cases(device, quick=False)[case_index]
    models = build(case, device)
    inputs = part_inputs(case, models[0], device)
    run = part_function(part, impl, models, inputs)
    run()  # warm-up: lazy initialisations and allocator caches are not activations
    for model in models:
        model.zero_grad(set_to_none=True)
    for tensor in [inputs["projected"], inputs["attention"], *inputs["fpn"], inputs["pred_masks"]]:
        tensor.grad = None
    return peak_memory_mib(run, device)


def peak_rows(case_index: int, case: dict, device: str) -> list[dict]:
    """Each part by each implementation, in a fresh process."""
    rows = []
    for part in PARTS:
        for impl in IMPLS:
            worker = [sys.executable, os.path.abspath(__file__), "--device", device, "--worker", str(case_index)]
            peak = worker_peak_mib([*worker, part, impl])
            rows.append({"case": case["name"], "part": f"peak {part}", "impl": impl, "peak_mib": round(peak, 1)})
    return rows


# --------------------------------------------------------------------------------------------------- targets


def memory_line(rows: list[dict], case: str, info: dict) -> str:
    """The target line of the mask head + loss's peak activation memory: detr_fast's <= 1/3 of transformers'."""
    ours, theirs = (row_of(rows, impl, case=case, part="peak mask head + loss") for impl in IMPLS)
    where = f"{case}: peak activation memory of the mask head + loss"
    if ours is None or theirs is None:
        return f"{verdict(None)} {where} (target <= 1/3 of transformers')"
    fraction = ours["peak_mib"] / theirs["peak_mib"]
    return (
        f"{verdict(fraction <= 1 / 3)} {where}: detr_fast {ours['peak_mib']:.1f} MiB vs transformers "
        f"{theirs['peak_mib']:.1f} MiB = {fraction:.2f} of theirs (target <= 0.33)"
    )


def target_lines(rows: list[dict], info: dict) -> list[str]:
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ours, theirs = (row_of(rows, impl, case=case, part="step") for impl in IMPLS)
        lines.append(speedup_line(f"{case}: segmentation step", ours, theirs, IMPLS, 1.5, info))
        lines.append(memory_line(rows, case, info))
    return lines


def comparison_lines(rows: list[dict]) -> list[str]:
    """Per case: the step's losses and the peak memory of each part."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ours, theirs = (row_of(rows, impl, case=case, part="step") for impl in IMPLS)
        lines.append(f"- {case}: step loss detr_fast {ours['loss']:.5f} vs transformers {theirs['loss']:.5f}")
        for part in PARTS:
            mine, their = (row_of(rows, impl, case=case, part=f"peak {part}") for impl in IMPLS)
            share = mine["peak_mib"] / their["peak_mib"]
            lines.append(
                f"- {case}: peak activation memory of the {part}: detr_fast {mine['peak_mib']:.1f} MiB vs "
                f"transformers {their['peak_mib']:.1f} MiB ({share:.2f} of theirs)"
            )
    return lines


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--worker",
        nargs=3,
        metavar=("CASE", "PART", "IMPL"),
        help="internal: measure one part's peak memory in this process and print it as JSON",
    )
    args = p.parse_args()
    if args.worker:
        case_index, part, impl = args.worker
        print(json.dumps({"peak_mib": measure_peak(int(case_index), part, impl, args.device)}))
        return 0
    import transformers

    device = args.device
    info = {**environment(device), "transformers": transformers.__version__}
    repeats = args.repeats or (3 if args.quick else 7)
    rows: list[dict] = []
    for index, case in enumerate(cases(device, args.quick)):
        rows += step_rows(case, device, repeats)
        rows += peak_rows(index, case, device)
    record_end_load(info)
    lines = target_lines(rows, info)
    comparisons = comparison_lines(rows)
    notes = [TARGETS, *[f"- {line}" for line in lines], "", "Per case:", *comparisons]
    write_results("segmentation", rows, info, args.out, notes="\n".join(notes))
    print("\n".join(comparisons))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
