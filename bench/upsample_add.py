"""Benchmark of the `upsample_add` op (a fusion stage of the mask head: the nearest upsample of per-query maps plus
the broadcast add of their image's features), forward + backward, against PyTorch's upsample then add.

Implementations:
  detr_fast                 ops.upsample_add: the Triton kernel on CUDA (one pass, the result written once); on the
                            CPU its reference (PyTorch's upsample, then the add in place into it)
  upsample + add            F.interpolate(nearest), then a broadcast add into a new tensor (the mask head before)
The output gradient is channels-last per map, as the convolution that follows returns it. On CUDA each row also
gives the peak memory the call allocates beyond its inputs (peak_mib).

Cases: the three fusion stages of a mask head on B=2 images and 100 queries: d_model 128 on 256 x 320 images
(CPU), d_model 256 on 800 x 1066 images in fp32 and bf16 (CUDA).

    python bench/upsample_add.py --device cpu --out bench/results
    python bench/upsample_add.py --device cuda --out DIR
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

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
    write_results,
)

from detr_fast import ops  # noqa: E402

TARGET = "Target: detr_fast at least as fast as upsample + add at every stage, forward + backward."


def cases(device: str, quick: bool) -> list[dict]:
    """Each stage's channels C, input size (h, w) and output size (H, W), and the dtype."""
    d_model, (height, width) = (256, (800, 1066)) if device == "cuda" else (128, (256, 320))
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    found = []
    for dtype in dtypes:
        for stage, stride in enumerate((16, 8, 4)):
            found.append(
                dict(
                    stage=stage + 1,
                    C=d_model // 2 ** (stage + 1),
                    size_in=(-(-height // (2 * stride)), -(-width // (2 * stride))),
                    size_out=(-(-height // stride), -(-width // stride)),
                    dtype=dtype,
                )
            )
    return found[:1] if quick else found


def plain(features: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """F.interpolate, then a broadcast add into a new tensor."""
    upsampled = F.interpolate(features.flatten(0, 1), size=adapted.shape[-2:], mode="nearest")
    return upsampled.unflatten(0, features.shape[:2]) + adapted[:, None]


def rows_of(case: dict, device: str, repeats: int) -> list[dict]:
    batch, queries = 2, 100
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(batch * queries, case["C"], *case["size_in"], generator=generator)
    maps = maps.to(device=device, dtype=case["dtype"]).contiguous(memory_format=torch.channels_last)
    features = maps.unflatten(0, (batch, queries)).requires_grad_()
    adapted = torch.randn(batch, case["C"], *case["size_out"], generator=generator)
    adapted = adapted.to(device=device, dtype=case["dtype"]).requires_grad_()
    grad = torch.randn(batch * queries, case["C"], *case["size_out"], generator=generator)
    grad = grad.to(device=device, dtype=case["dtype"]).contiguous(memory_format=torch.channels_last)
    grad = grad.unflatten(0, (batch, queries))

    def call(fn):
        def run():
            fn(features, adapted).backward(grad)
            features.grad = adapted.grad = None

        return run

    fns = {"detr_fast": call(ops.upsample_add), "upsample + add": call(plain)}
    timings = time_all(fns, device, repeats=repeats)
    fields = dict(
        stage=case["stage"],
        BQ=batch * queries,
        C=case["C"],
        size=f"{case['size_in'][0]}x{case['size_in'][1]}->{case['size_out'][0]}x{case['size_out'][1]}",
        dtype=str(case["dtype"]).replace("torch.", ""),
    )
    return [
        {**fields, "impl": impl, **timings[impl].columns(), "peak_mib": peak_memory_mib(fn, device)}
        for impl, fn in fns.items()
    ]


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    info = environment(device)
    repeats = args.repeats or (3 if args.quick else 7)
    rows = [row for case in cases(device, args.quick) for row in rows_of(case, device, repeats)]
    record_end_load(info)
    lines = []
    for stage, dtype in dict.fromkeys((row["stage"], row["dtype"]) for row in rows):
        ours, plain_row = (row_of(rows, impl, stage=stage, dtype=dtype) for impl in ("detr_fast", "upsample + add"))
        where = f"{device} stage {stage} {ours['size']} C={ours['C']} {dtype}"
        lines.append(speedup_line(where, ours, plain_row, ("detr_fast", "upsample + add"), 1.0, info))
    write_results("upsample_add", rows, info, args.out, notes="\n".join([TARGET, *[f"- {line}" for line in lines]]))
    return report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
