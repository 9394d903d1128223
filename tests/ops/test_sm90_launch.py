"""Every Triton kernel (attention, projection, matching cost, box loss) compiles for an H100 (sm_90a) through its
real launch helper, without a GPU, and ptxas reports (almost) no register spills for the block sizes chosen.

The interpreter runs the kernels as Python, so it misses what only the compiler sees: dtype mixes, the 3xTF32
split of fp32 dots, register pressure. Here a subprocess swaps Triton's CUDA driver for a stand-in that only answers
"sm_90", and turns every launch into a warm-up (compile, no run); the launch helpers run unchanged, so the
specialization (argument types, strides, constexprs, num_warps) is exactly what a GPU would compile.
"""

import json
import subprocess
import sys

import pytest

from ..helpers import DEVICE

_COMPILE_THROUGH_LAUNCHERS = r"""
import json, os, re, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise AttributeError(name)


driver.set_active(CompileOnlyDriver())
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
launch = JITFunction.run
results = []


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    spills = re.search(r"(\d+) bytes spill stores", report.stdout + report.stderr)
    results.append({"case": case, "kernel": self.__name__, "spill_bytes": int(spills.group(1)) if spills else 0,
                    "mma": "wgmma" in kernel.asm["ptx"] or "mma.sync" in kernel.asm["ptx"]})
    return kernel


JITFunction.run = compile_only
import detr_fast.kernels.attention as attention
import detr_fast.kernels.box_loss as box_loss
import detr_fast.kernels.match_cost as match_cost
import detr_fast.kernels.qkv_projection as qkv_projection

attention.triton_interpreted = qkv_projection.triton_interpreted = lambda: False
attention.multiprocessors = lambda index: 132  # an H100 SXM
for dtype in (torch.float32, torch.bfloat16):
    for head_dim in (32, 64, 128):
        case = f"attention {dtype} D={head_dim}"
        q, k, v = torch.randn(2, 300, 3, 2, head_dim, dtype=dtype).unbind(2)  # the projections' [B, L, H, D] views
        mask, seed = torch.zeros(2, 300, dtype=torch.bool), torch.tensor([5])
        out, lse = attention.attention_forward(q, k, v, mask, seed, 0.1, head_dim**-0.5)
        attention.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, seed, 0.1, head_dim**-0.5)
    case = f"qkv_projection {dtype}"
    x, pos = (torch.randn(2, 256, 1050, dtype=dtype).transpose(1, 2) for _ in range(2))  # the encoder's [B, S, C]
    qkv_projection.qkv_projection_forward(
        x, pos, torch.randn(768, 256, dtype=dtype), torch.randn(768, dtype=dtype), 512
    )
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    labels, mask = torch.randint(0, 91, (2, 31)), torch.rand(2, 31) < 0.5
    for focal in (False, True):
        case = f"match_cost {dtype} focal={focal}"
        match_cost.match_cost_forward(torch.randn(6, 2, 100, 92, dtype=dtype), torch.rand(6, 2, 100, 4, dtype=dtype),
                                      labels, torch.rand(2, 31, 4), mask, 1.1, 5.0, 0.3, focal, 0.25, 2.0)
    case = f"box_loss {dtype}"
    pred, tgt, weight = torch.rand(6, 200, 4, dtype=dtype), torch.rand(6, 200, 4, dtype=dtype), torch.rand(6, 200)
    box_loss.box_loss_forward(pred, tgt, weight)
    box_loss.box_loss_backward(pred, tgt, weight, torch.ones(6), torch.ones(6), True, True)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    if DEVICE != "cpu":
        pytest.skip("on CUDA the kernel tests compile and run every kernel on the real device")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_THROUGH_LAUNCHERS], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_launch_compiles_for_sm90(compiled):
    # 3 attention kernels x 3 head dims x 2 dtypes and the projection in 2 dtypes, on the tensor cores; the
    # matching cost (softmax and focal) and the box loss (forward, backward) in 3 dtypes.
    dots = [row for row in compiled if row["case"].startswith(("attention", "qkv_projection"))]
    assert len(dots) == 20 and len(compiled) == 20 + 3 * 4
    assert all(row["mma"] for row in dots), [row for row in dots if not row["mma"]]


def test_register_spills_stay_small(compiled):
    # fp32 attention at D = 128 spills a few bytes with 3xTF32 (16-32 bytes, depending on the triton version), the
    # fp64 box loss at most 4 bytes; the rest none.
    for row in compiled:
        limit = 64 if "float32 D=128" in row["case"] else 8 if "box_loss torch.float64" in row["case"] else 0
        assert row["spill_bytes"] <= limit, row
