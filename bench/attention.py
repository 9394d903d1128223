"""Benchmark of `attention` at DETR's shapes: the Triton kernel against the attention a user would otherwise run.

Cases (H = 8, D = 32, DETR's d_model 256): encoder self-attention B = 8, L = S = 1050 (a 30 x 35 feature map,
0-30 % of each image padded, bottom-right as a padding collate does); decoder self-attention 100 x 100; decoder
cross-attention 100 x 1050 with the encoder's padding; forward and forward+backward; fp32 and bf16. Plus a kernel
quality check: L = S = 4096, D = 64, no padding, bf16 forward against SDPA's flash backend.

Implementations: detr_fast's kernel (CUDA only); transformers' eager attention (its eager_attention_forward with
the additive float mask it builds); SDPA with the boolean mask (whichever backend SDPA picks); FlexAttention with a
padding block mask (torch.compile'd; the block mask is built once per case, outside the timing); detr_fast's
reference. q, k, v are the strided views of one projection output, as in the model.

Reports median time, achieved TFLOP/s (nominal 4 B H L S D per forward, 3.5x that for forward+backward, padding
included) and the peak memory the call allocates on the GPU, then the issue's targets next to the measurements; the
script exits 1 where one FAILs.

    python bench/attention.py --device cuda --out bench/results
    python bench/attention.py --device cpu --quick    # reference paths only, about a minute
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

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

from detr_fast import backend, ops, reference  # noqa: E402

HEADS, HEAD_DIM = 8, 32
FEATURE_MAP = (30, 35)  # 1050 tokens: an 800 x ~1100 image at stride 32
QUERIES = 100
TARGETS = (
    "Targets (H100): encoder fwd+bwd >= 2x faster than SDPA with the mask and >= 4x faster than eager, in bf16 and "
    "fp32, with peak memory linear in L; L = S = 4096 bf16 forward within 1.5x of SDPA's flash backend."
)


def padding_masks(batch: int, device: str) -> torch.Tensor:
    """[B, S] bool, True = padding: image i keeps a top-left block covering 100 % down to 70 % of the map."""
    height, width = FEATURE_MAP
    mask = torch.ones(batch, height, width, dtype=torch.bool, device=device)
    for i in range(batch):
        kept = 1.0 - 0.3 * i / max(batch - 1, 1)
        mask[i, : math.ceil(height * kept**0.5), : math.ceil(width * kept**0.5)] = False
    return mask.flatten(1)


def transformers_eager() -> Callable | None:
    """transformers' DETR eager attention as a function of [B, H, L, D] tensors and an additive mask, or None."""
    try:
        from transformers.models.detr.modeling_detr import eager_attention_forward
    except ImportError:
        return None
    module = torch.nn.Module()  # eager_attention_forward reads module.training for its dropout
    return lambda q, k, v, additive_mask: eager_attention_forward(module, q, k, v, additive_mask)[0]


def flex_attention_fn(batch: int, length: int, source: int, mask: torch.Tensor | None, device: str):
    """A compiled flex_attention call with a key-padding block mask, or (None, why not)."""
    if device != "cuda":
        return None, "FlexAttention skipped: it runs compiled on CUDA only in this benchmark"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return None, f"FlexAttention unavailable: {error}"
    block_mask = None
    if mask is not None:

        def keep(b, h, q_idx, kv_idx):
            return ~mask[b, kv_idx]

        block_mask = create_block_mask(keep, batch, None, length, source, device=device)
    compiled = torch.compile(flex_attention)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), None


def implementations(batch, length, source, mask, device):
    """name -> attention(q, k, v) on [B, L, H, D] views, plus notes on what was skipped."""
    notes = []
    impls = {}
    if device == "cuda":

        def kernel(q, k, v):
            with backend("kernel"):
                return ops.attention(q, k, v, mask)

        impls["detr_fast kernel"] = kernel
    else:
        notes.append("detr_fast kernel skipped: Triton kernels need CUDA (the CPU interpreter is a test tool)")
    eager = transformers_eager()
    if eager is None:
        notes.append("transformers eager skipped: transformers.models.detr has no eager_attention_forward")
    else:

        def transformers_eager_attention(q, k, v):
            additive = None
            if mask is not None:
                additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                additive = additive.masked_fill(mask, torch.finfo(q.dtype).min)[:, None, None, :]  # [B, 1, 1, S]
            return eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive)  # [B, L, H, D]

        impls["transformers eager"] = transformers_eager_attention

    def sdpa(q, k, v):
        attend = None if mask is None else ~mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attend)
        return out.transpose(1, 2)

    impls["SDPA (bool mask)"] = sdpa
    flex, why = flex_attention_fn(batch, length, source, mask, device)
    if flex is None:
        notes.append(why)
    else:
        impls["FlexAttention"] = lambda q, k, v: flex(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    impls["detr_fast reference"] = lambda q, k, v: reference.attention(q, k, v, mask)
    return impls, notes


def projection_views(batch, length, source, self_attention, dtype, device, requires_grad):
    """Leaves in the projection layout and the q, k, v views of them, [B, L|S, H, D] each."""
    if self_attention:
        qkv = torch.randn(batch, length, 3, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
        return [qkv], qkv.unbind(2)
    q = torch.randn(batch, length, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
    kv = torch.randn(batch, source, 2, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
    return [q, kv], (q, *kv.unbind(2))


def timed_call(attend, q, k, v, leaves, grad_out, training):
    """What one timed repetition runs: the forward, or the forward and the gradients of the leaves."""
    if not training:
        return lambda: attend(q, k, v)
    return lambda: torch.autograd.grad(attend(q, k, v), leaves, grad_out)


def measure_case(name, batch, length, source, self_attention, masked, dtype, args, rows, notes):
    """Time every implementation on one shape, forward and forward+backward; append one row per timing."""
    device = args.device
    mask = padding_masks(batch, device) if masked else None
    impls, skipped = implementations(batch, length, source, mask, device)
    notes.extend(f"{name}: {note}" for note in skipped)
    forward_flops = 4 * batch * HEADS * length * source * HEAD_DIM
    for mode in ("fwd", "fwd+bwd"):
        training = mode == "fwd+bwd"
        # Forward-only inputs need no gradient, so no implementation records an autograd graph.
        leaves, (q, k, v) = projection_views(batch, length, source, self_attention, dtype, device, training)
        grad_out = torch.randn(batch, length, HEADS, HEAD_DIM, device=device, dtype=dtype)

        fns = {impl: timed_call(attend, q, k, v, leaves, grad_out, training) for impl, attend in impls.items()}
        if "FlexAttention" in fns:  # a peer whose support for these shapes varies across torch versions
            try:
                fns["FlexAttention"]()
            except Exception as error:
                notes.append(f"{name} {mode}: FlexAttention failed and is left out ({type(error).__name__}: {error})")
                del fns["FlexAttention"]
        timings = time_all(fns, device, repeats=args.repeats or (3 if args.quick else 7))
        for impl, fn in fns.items():
            flops = forward_flops * (3.5 if training else 1.0)
            rows.append(
                dict(
                    case=name,
                    B=batch,
                    L=length,
                    S=source,
                    H=HEADS,
                    D=HEAD_DIM,
                    masked=masked,
                    dtype=str(dtype).replace("torch.", ""),
                    mode=mode,
                    impl=impl,
                    **timings[impl].columns(),
                    tflops=flops / (timings[impl].ms * 1e-3) / 1e12,
                    peak_mib=peak_memory_mib(fn, device),
                )
            )
        print(f"{name} {dtype} {mode}: " + ", ".join(f"{k} {v.ms:.3f} ms" for k, v in timings.items()), flush=True)


def target_lines(rows, info) -> list[str]:
    """The issue's targets, one PASS / FAIL / NOT MEASURED line each (all NOT MEASURED where no kernel was timed)."""
    if row_of(rows, "detr_fast kernel", case="encoder", dtype="float32", mode="fwd+bwd") is None:
        return ["NOT MEASURED: the H100 targets (no kernel timings on this device: bench/gpu_suite.sh measures them)"]
    lines = []
    for dtype in ("float32", "bfloat16"):
        case = dict(case="encoder", dtype=dtype, mode="fwd+bwd")
        kernel = row_of(rows, "detr_fast kernel", **case)
        for peer, goal in (("SDPA (bool mask)", 2.0), ("transformers eager", 4.0)):
            other = row_of(rows, peer, **case)
            lines.append(speedup_line(f"encoder fwd+bwd {dtype}", kernel, other, ("kernel", peer), goal, info))
    long = dict(case="long-4096", dtype="bfloat16", mode="fwd")
    kernel, flash = row_of(rows, "detr_fast kernel", **long), row_of(rows, "SDPA flash", **long)
    where = "L=S=4096 bf16 forward, within 1.5x of SDPA flash's time"
    lines.append(speedup_line(where, kernel, flash, ("kernel", "SDPA flash"), 1 / 1.5, info))
    return lines


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    batch = 2 if args.quick else 8
    dtypes = [torch.float32] if args.quick or device == "cpu" else [torch.float32, torch.bfloat16]
    source = FEATURE_MAP[0] * FEATURE_MAP[1]
    rows: list[dict] = []
    notes: list[str] = []
    if device == "cpu":
        notes.append("CPU: reference paths only, fp32 only (bf16 matmuls on CPU say nothing about the GPU)")
    if args.quick:
        notes.append(f"--quick: batch {batch}, fp32, {args.repeats or 3} repeats")
    info = environment(device)
    for dtype in dtypes:
        measure_case("encoder", batch, source, source, True, True, dtype, args, rows, notes)
        measure_case("decoder-self", batch, QUERIES, QUERIES, True, False, dtype, args, rows, notes)
        measure_case("cross", batch, QUERIES, source, False, True, dtype, args, rows, notes)
    if device == "cuda" and not args.quick:
        measure_long(args, rows)
    else:
        notes.append("L=S=4096 flash check skipped: it needs CUDA and is not part of --quick")
    record_end_load(info)
    lines = target_lines(rows, info)
    # dict.fromkeys: each dtype repeats the same skips.
    notes = [TARGETS, *[f"- {line}" for line in lines], *[f"- {n}" for n in dict.fromkeys(notes)]]
    write_results("attention", rows, info, args.out, notes="\n".join(notes))
    return report_targets(lines)


def measure_long(args, rows) -> None:
    """L = S = 4096, D = 64, no padding, bf16 forward: the kernel against SDPA forced onto its flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, length, head_dim = 4, 16, 4096, 64
    q, k, v = (torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def kernel():
        with backend("kernel"):
            return ops.attention(q, k, v)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    fns = {"detr_fast kernel": kernel, "SDPA flash": flash}
    timings = time_all(fns, "cuda")
    flops = 4 * batch * heads * length * length * head_dim
    for impl, fn in fns.items():
        rows.append(
            dict(
                case="long-4096",
                B=batch,
                L=length,
                S=length,
                H=heads,
                D=head_dim,
                masked=False,
                dtype="bfloat16",
                mode="fwd",
                impl=impl,
                **timings[impl].columns(),
                tflops=flops / (timings[impl].ms * 1e-3) / 1e12,
                peak_mib=peak_memory_mib(fn, "cuda"),
            )
        )
    print("long-4096 bf16 fwd: " + ", ".join(f"{k} {v.ms:.3f} ms" for k, v in timings.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
