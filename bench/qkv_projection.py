"""Benchmark of `qkv_projection` (positional addition fused into the input projections) at DETR's shapes.

Cases (d_model C = 256, B = 8): encoder self-attention qkv (x, pos [B, 1050, C] as the transposed feature-map view,
W [3C, C], pos_rows 2C); decoder self-attention qkv ([B, 100, C]); decoder cross-attention kv (memory [B, 1050, C],
W [2C, C], pos_rows C) and q ([B, 100, C], W [C, C], pos_rows C). Forward and forward+backward, fp32 and bf16.

Implementations: detr_fast's kernel (CUDA only); transformers' layout (three nn.Linear calls: q and k on x + pos,
v on x); detr_fast's reference (x + pos once, one linear for the pos rows and one for the rest, then cat); the
reference under torch.compile; and "cuBLAS (x+pos)@W", one add and one linear over all R rows, the bound the issue
sets (not the same function when pos_rows < R: it is the cost of the GEMM alone plus one write and read of x + pos).

Reports median time, achieved TFLOP/s (2 M R C per forward, 3x for forward+backward), peak memory allocated by the
call, and the issue's target next to the measurements; the script exits 1 where it FAILs.

    python bench/qkv_projection.py --device cuda --out bench/results
    python bench/qkv_projection.py --device cpu --quick    # reference paths only, about a minute
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import FEATURE_MAP, QUERIES  # noqa: E402
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

from detr_fast import backend, ops, reference  # noqa: E402

CHANNELS = 256
TARGET = "Target (H100): qkv_projection no slower than cuBLAS (x+pos)@W, saving one write and one read of x + pos."


def cases(quick: bool):
    """(name, tokens per image, output rows R, pos_rows, x and pos are the transposed feature-map view)."""
    source = FEATURE_MAP[0] * FEATURE_MAP[1]
    all_cases = [
        ("encoder-qkv", source, 3 * CHANNELS, 2 * CHANNELS, True),
        ("decoder-self-qkv", QUERIES, 3 * CHANNELS, 2 * CHANNELS, False),
        ("cross-kv", source, 2 * CHANNELS, CHANNELS, False),
        ("cross-q", QUERIES, CHANNELS, CHANNELS, False),
    ]
    return all_cases[:2] if quick else all_cases


def implementations(rows: int, pos_rows: int, device: str, compile_reference: bool):
    """name -> projection(x, pos, weight, bias) -> [..., R], plus notes on what was skipped."""
    notes = []
    impls = {}
    if device == "cuda":

        def kernel(x, pos, weight, bias):
            with backend("kernel"):
                return ops.qkv_projection(x, pos, weight, bias, pos_rows)

        impls["detr_fast kernel"] = kernel
    else:
        notes.append("detr_fast kernel skipped: Triton kernels need CUDA (the CPU interpreter is a test tool)")

    def transformers_layout(x, pos, weight, bias):
        # One nn.Linear per projection, as transformers' DETR: x + pos computed once and read by q and k.
        with_pos = x + pos
        outs = [
            F.linear(with_pos if start < pos_rows else x, weight[start:end], bias[start:end])
            for start, end in zip(range(0, rows, CHANNELS), range(CHANNELS, rows + 1, CHANNELS), strict=True)
        ]
        return torch.cat(outs, -1)

    impls["transformers (separate linears)"] = transformers_layout
    impls["detr_fast reference"] = lambda x, pos, weight, bias: reference.qkv_projection(x, pos, weight, bias, pos_rows)
    if compile_reference:
        compiled = torch.compile(reference.qkv_projection)
        impls["torch.compile(reference)"] = lambda x, pos, weight, bias: compiled(x, pos, weight, bias, pos_rows)
    else:
        notes.append("torch.compile(reference) skipped in --quick on CPU (compiling takes longer than the run)")
    impls["cuBLAS (x+pos)@W"] = lambda x, pos, weight, bias: F.linear(x + pos, weight, bias)
    return impls, notes


def make_inputs(batch, tokens, rows, transposed, dtype, device, requires_grad):
    """x, pos [B, T, C] (the transposed view of [B, C, T] for the encoder's feature map), weight [R, C], bias [R]."""
    if transposed:
        x, pos = (torch.randn(batch, CHANNELS, tokens, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        x, pos = (torch.randn(batch, tokens, CHANNELS, device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(rows, CHANNELS, device=device, dtype=dtype) * CHANNELS**-0.5
    bias = torch.randn(rows, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, pos, weight, bias)]


def measure(name, batch, tokens, rows, pos_rows, transposed, dtype, mode, impls, args, rows_out) -> None:
    """Time every implementation on one case and pass; append one row per timing."""
    device = args.device
    training = mode == "fwd+bwd"
    inputs = make_inputs(batch, tokens, rows, transposed, dtype, device, training)
    grad_out = torch.randn(batch, tokens, rows, device=device, dtype=dtype)

    def timed_call(project):
        if not training:
            return lambda: project(*inputs)
        return lambda: torch.autograd.grad(project(*inputs), inputs, grad_out)

    fns = {impl: timed_call(project) for impl, project in impls.items()}
    timings = time_all(fns, device, repeats=args.repeats or (3 if args.quick else 7))
    flops = 2 * batch * tokens * rows * CHANNELS * (3 if training else 1)
    for impl, fn in fns.items():
        rows_out.append(
            dict(
                case=name,
                B=batch,
                tokens=tokens,
                C=CHANNELS,
                R=rows,
                pos_rows=pos_rows,
                dtype=str(dtype).replace("torch.", ""),
                mode=mode,
                impl=impl,
                **timings[impl].columns(),
                tflops=flops / (timings[impl].ms * 1e-3) / 1e12,
                peak_mib=peak_memory_mib(fn, device),
            )
        )
    print(f"{name} {dtype} {mode}: " + ", ".join(f"{k} {v.ms:.3f} ms" for k, v in timings.items()), flush=True)


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    cpu = device == "cpu"
    info = environment(device)
    batch = 2 if args.quick else 8
    dtypes = [torch.float32] if args.quick or cpu else [torch.float32, torch.bfloat16]
    rows_out: list[dict] = []
    notes: list[str] = []
    if cpu:
        notes.append("CPU: reference paths only, fp32 only")
    if args.quick:
        notes.append(f"--quick: batch {batch}, fp32, the two self-attention cases, {args.repeats or 3} repeats")
    for dtype in dtypes:
        for name, tokens, rows, pos_rows, transposed in cases(args.quick):
            impls, skipped = implementations(rows, pos_rows, device, compile_reference=not (args.quick and cpu))
            notes.extend(skipped)
            for mode in ("fwd", "fwd+bwd"):
                measure(name, batch, tokens, rows, pos_rows, transposed, dtype, mode, impls, args, rows_out)
    record_end_load(info)
    lines = target_lines(rows_out, info)
    # dict.fromkeys: each case repeats the same skips.
    notes = [TARGET, *[f"- {line}" for line in lines], *[f"- {n}" for n in dict.fromkeys(notes)]]
    write_results("qkv_projection", rows_out, info, args.out, notes="\n".join(notes))
    return report_targets(lines)


def target_lines(rows, info) -> list[str]:
    """The kernel against cuBLAS (x+pos)@W per case, dtype and pass where the kernel was timed: no slower."""
    lines = []
    for row in rows:
        if row["impl"] == "detr_fast kernel":
            case = dict(case=row["case"], dtype=row["dtype"], mode=row["mode"])
            cublas = row_of(rows, "cuBLAS (x+pos)@W", **case)
            where = f"{row['case']} {row['dtype']} {row['mode']}"
            lines.append(speedup_line(where, row, cublas, ("kernel", "cuBLAS (x+pos)@W"), 1.0, info))
    return lines or ["NOT MEASURED: the H100 target (no kernel timings on this device: bench/gpu_suite.sh measures it)"]


if __name__ == "__main__":
    sys.exit(main())
