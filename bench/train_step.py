"""Benchmark of the whole DETR training step, detr_fast against transformers' DetrForObjectDetection with the same
weights and the same batch.

A step is forward with labels, backward, gradient clipping (0.1) and fused AdamW; each model gets the labels in the form
its own pipeline produces (detr_fast: padded targets from the collate; transformers: a list of per-image dicts).

Cases:
- The criterion alone (every case, every device): matching + losses + backward of 6 decoder layers x B=8 x 100
  queries, 91 classes, 1-25 targets per image: detr_fast.loss.DetrLoss on padded targets against transformers'
  ForObjectDetectionLoss on per-image labels.
- CPU (`--device cpu`): a DETR sized like the `synthetic` preset (resnet18, d_model 128, 2+3 layers, aux loss,
  6 queries) on 16 synthetic 128 x 128 images, and a tiny DETR (d_model 64) on 3 small padded images; fp32,
  interleaved medians.
- CUDA (`--device cuda`): DETR-R50 (transformers' defaults: 6+6 layers, 100 queries, aux loss), B = 8 images of
  about 800 x 1066 padded to the batch maximum, 1-20 boxes each, bf16 autocast; CUDA-event medians. Also checks
  that detr_fast's step between forward and backward has no host sync (torch.cuda.set_sync_debug_mode("error")).

The targets are printed next to the measurements; the script exits 1 where one FAILs.

    python bench/train_step.py --device cpu --quick
    python bench/train_step.py --device cuda --out bench/results
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    parser,
    record_end_load,
    report_targets,
    row_of,
    speedup_line,
    time_all,
    verdict,
    write_results,
)

from detr_fast import DetrConfig, DetrForObjectDetection, pad_targets  # noqa: E402
from detr_fast.data.collate import collate  # noqa: E402
from detr_fast.data.synthetic import SyntheticSpec, render_target  # noqa: E402
from detr_fast.data.transforms import ToModelInput  # noqa: E402

TARGETS = (
    "Targets: CPU tiny-config step no slower than transformers' (goal 1.2x faster); H100 DETR-R50 step "
    "(B=8, ~800x1066, bf16, aux loss) >= 1.5x faster than transformers' with the same loss, and no host sync "
    "between forward and backward."
)
TINY_CASE = "tiny B=3 64x96 fp32"
R50_CASE = "DETR-R50 B=8 ~800x1066 bf16 aux"


def synthetic_batch(num_images: int, size: int) -> dict:
    """A collated batch of synthetic images (detr_fast's collate: padded targets, pixel mask)."""
    spec = SyntheticSpec(min_size=size, max_size=size)
    return collate([ToModelInput()(*render_target(index, seed=0, spec=spec), None) for index in range(num_images)])


def random_batch(sizes: list[tuple[int, int]], num_labels: int, device: str) -> dict:
    """Random images of the given sizes padded to the largest, with 1-20 random boxes each."""
    generator = torch.Generator().manual_seed(0)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.int64)
    labels = []
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
        count = int(torch.randint(1, 21, (1,), generator=generator))
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, num_labels, (count,), generator=generator),
                "boxes": torch.cat([centres, sides], -1),
            }
        )
    return {
        "pixel_values": pixel_values.to(device),
        "pixel_mask": pixel_mask.to(device),
        "labels": pad_targets(labels, device=device),
    }


def per_image_labels(padded: dict) -> list[dict]:
    """transformers' label format from padded targets."""
    rows = zip(padded["class_labels"], padded["boxes"], padded["mask"])
    return [{"class_labels": c[m], "boxes": b[m]} for c, b, m in rows]


def make_step(model, batch, labels, amp_dtype):
    """forward + backward + clip + AdamW of `model` on `batch`; returns (step function, loss before training)."""
    # The same optimizer for both: fused AdamW, the fastest on CPU and GPU, as detr_fast's training loop uses.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4, fused=True
    )
    device = batch["pixel_values"].device

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            output = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss.detach()

    model.eval()  # the loss without dropout, comparable between the two models
    with torch.no_grad():
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            first = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels).loss
    model.train()
    return step, float(first)


def sync_free(model, batch, amp_dtype) -> str:
    """'yes' if detr_fast's forward and backward run under set_sync_debug_mode("error"), else the error."""
    with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"]).loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"]).loss.backward()
        return "yes"
    except RuntimeError as error:
        return f"no ({str(error).splitlines()[0][:120]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)


def criterion_rows(device: str, repeats: int) -> list[dict]:
    """The criterion alone, detr_fast's against transformers', on the same predictions and targets."""
    import transformers
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    from detr_fast.loss import DetrLoss

    config = transformers.DetrConfig(num_labels=91, auxiliary_loss=True, use_pretrained_backbone=False)
    generator = torch.Generator().manual_seed(0)
    layers, batch, queries = 6, 8, 100
    logits = torch.randn(layers, batch, queries, 92, generator=generator).to(device).requires_grad_()
    boxes = torch.cat(
        [
            torch.rand(layers, batch, queries, 2, generator=generator) * 0.8 + 0.1,
            torch.rand(layers, batch, queries, 2, generator=generator) * 0.3 + 0.05,
        ],
        -1,
    )
    boxes = boxes.to(device).requires_grad_()
    counts = [3, 20, 7, 12, 1, 25, 9, 14]
    labels = [
        {
            "class_labels": torch.randint(0, 91, (m,), generator=generator).to(device),
            "boxes": torch.cat(
                [torch.rand(m, 2, generator=generator) * 0.6 + 0.2, torch.rand(m, 2, generator=generator) * 0.3 + 0.05],
                -1,
            ).to(device),
        }
        for m in counts
    ]
    padded = pad_targets(labels, device=device)
    criterion = DetrLoss.from_config(config).to(device)

    def ours():
        loss = criterion(logits, boxes, padded)[0]
        loss.backward()
        return loss

    def theirs():
        loss = ForObjectDetectionLoss(logits[-1], labels, device, boxes[-1], config, logits, boxes)[0]
        loss.backward()
        return loss

    timings = time_all({"detr_fast": ours, "transformers": theirs}, device, repeats=repeats)
    case = "criterion 6 layers x B=8 x 100 queries, loss + backward"
    return [
        {"case": case, "impl": "detr_fast", **timings["detr_fast"].columns(), "loss": float(ours().detach())},
        {"case": case, "impl": "transformers", **timings["transformers"].columns(), "loss": float(theirs().detach())},
    ]


def comparison_lines(rows: list[dict]) -> list[str]:
    """Per case: both times, transformers' over detr_fast's, both losses before training and, where it was checked,
    whether detr_fast's step is free of host syncs."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ours, theirs = (row_of(rows, impl, case=case) for impl in ("detr_fast", "transformers"))
        line = (
            f"- {case}: detr_fast {ours['ms']:.2f} ms vs transformers {theirs['ms']:.2f} ms = speedup "
            f"{theirs['ms'] / ours['ms']:.2f}x; loss {ours['loss']:.4f} vs {theirs['loss']:.4f}"
        )
        if "sync_free" in ours:
            line += f"; no host sync between forward and backward: {ours['sync_free']}"
        lines.append(line)
    return lines


def target_lines(rows: list[dict], info: dict) -> list[str]:
    """The targets, one PASS / FAIL / NOT MEASURED line each: the CPU tiny-config step no slower than transformers';
    the DETR-R50 step on CUDA >= 1.5x faster than transformers' and free of host syncs."""
    names = ("detr_fast", "transformers")
    tiny, r50 = ({impl: row_of(rows, impl, case=case) for impl in names} for case in (TINY_CASE, R50_CASE))
    lines = [
        speedup_line("CPU tiny-config step", tiny["detr_fast"], tiny["transformers"], names, 1.0, info),
        speedup_line("H100 DETR-R50 step", r50["detr_fast"], r50["transformers"], names, 1.5, info),
    ]
    if r50["detr_fast"] is None:
        return [*lines, "NOT MEASURED: no host sync between forward and backward (CUDA only)"]
    sync_free = r50["detr_fast"]["sync_free"]
    return [*lines, f"{verdict(sync_free == 'yes')} no host sync between forward and backward: {sync_free}"]


def cases(device: str, quick: bool) -> list[dict]:
    """(name, transformers config kwargs, batch, autocast dtype) of each measured case."""
    if device == "cuda":
        sizes = [(800, 1066), (800, 1199), (736, 1066), (800, 1013), (704, 1066), (800, 1066), (768, 1024), (800, 960)]
        return [
            dict(
                name=R50_CASE,
                amp=torch.bfloat16,
                batch=random_batch(sizes, 91, device),
                config=dict(backbone="resnet50", num_labels=91, auxiliary_loss=True, dropout=0.1),
            )
        ]
    # The synthetic preset's transformer and heads; the backbone is the whole resnet18 (stride 32), because
    # transformers v5 cannot build a timm backbone with other out_indices without the hub.
    synthetic = dict(
        name="synthetic-sized B=16 128x128 fp32",
        amp=None,
        batch=synthetic_batch(16, 128),
        config=dict(
            backbone="resnet18",
            num_labels=4,
            d_model=128,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            num_queries=6,
            dropout=0.0,
            auxiliary_loss=True,
        ),
    )
    tiny = dict(
        name=TINY_CASE,
        amp=None,
        batch=random_batch([(64, 96), (48, 80), (64, 50)], 7, device),
        config=dict(
            backbone="resnet18",
            num_labels=7,
            d_model=64,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=96,
            num_queries=12,
            dropout=0.0,
            auxiliary_loss=True,
        ),
    )
    return [synthetic] if quick else [tiny, synthetic]


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import transformers

    device = args.device
    info = {**environment(device), "transformers": transformers.__version__}
    repeats = args.repeats or (3 if args.quick else 7)
    rows = criterion_rows(device, repeats)
    for case in cases(device, args.quick):
        torch.manual_seed(0)
        ours = DetrForObjectDetection(DetrConfig(**case["config"])).to(device)
        theirs = ours.to_transformers().to(device)  # the same weights
        # The same trainable parameters: DETR freezes the ResNet stem and layer1, transformers does so only for a
        # pretrained backbone.
        for (_, mine), (_, their) in zip(ours.named_parameters(), theirs.named_parameters()):
            their.requires_grad_(mine.requires_grad)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in case["batch"].items()}
        batch["labels"] = {k: v.to(device) for k, v in batch["labels"].items()}
        our_step, our_loss = make_step(ours, batch, batch["labels"], case["amp"])
        their_step, their_loss = make_step(theirs, batch, per_image_labels(batch["labels"]), case["amp"])
        timings = time_all({"detr_fast": our_step, "transformers": their_step}, device, repeats=repeats)
        our_row = {"case": case["name"], "impl": "detr_fast", **timings["detr_fast"].columns(), "loss": our_loss}
        if device == "cuda":
            our_row["sync_free"] = sync_free(ours, batch, case["amp"])
        rows += [
            our_row,
            {"case": case["name"], "impl": "transformers", **timings["transformers"].columns(), "loss": their_loss},
        ]
    record_end_load(info)
    lines = target_lines(rows, info)
    comparisons = comparison_lines(rows)
    notes = [TARGETS, *[f"- {line}" for line in lines], "", "Per case:", *comparisons]
    write_results("train_step", rows, info, args.out, notes="\n".join(notes))
    print("\n".join(comparisons))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
