"""DETR descendants in transformers, patched vs unpatched: matching time and training step per step.

    python bench/detr_family.py [--quick] [--device cuda] [--out DIR]

Deformable DETR (auxiliary loss on, as it is trained), RT-DETR, D-FINE and RF-DETR at their default query counts
and decoder depths (300 queries; RF-DETR 300 x 13 Group-DETR groups in training), 80 classes, a batch of 16 images
with 1 to 29 targets each; the backbones and widths are tiny (random weights, built offline), so that the step is
mostly what the loss costs. Per step, interleaved repeats: "matching_ms", the time inside the matchers (every
layer, encoder proposals and group); "loss_ms", the time inside the model's loss function (matching included);
"ms", forward + loss + backward. transformers: its scipy matchers; detr_fast: the same model after
`detr_fast.integrations.transformers.patch(model)`: the whole criterion of Deformable DETR (FocalDetrLoss) and of
RT-DETR (VarifocalDetrLoss) and of RF-DETR (IouAwareDetrLoss) is detr_fast's, every layer (and the encoder
proposals, and every Group-DETR group) matched in one call; D-FINE keeps transformers' criterion, its layers matched
in one call ahead of it (rt_detr_prefetch). "same_loss": the
patched loss dict equals the unpatched one (rel 1e-5). --quick: 4 images, fewer repeats.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402

from detr_fast import loss as detr_loss  # noqa: E402
from detr_fast.integrations import detr_family  # noqa: E402
from detr_fast.integrations.transformers import patch, unpatch  # noqa: E402

TARGETS = "Target: matching at least 20x faster than transformers' matchers on the CPU (per training step)."
NUM_LABELS = 80


def labels_for(batch: int, device: str, seed: int = 0) -> list[dict]:
    """transformers' labels: 1 to 29 boxes per image (evenly spread over the batch), random classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for i in range(batch):
        count = 1 + (28 * i) // max(batch - 1, 1)
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels.append({
            "class_labels": torch.randint(0, NUM_LABELS, (count,), generator=generator).to(device),
            "boxes": torch.cat([centres, sizes], -1).to(device),
        })  # fmt: skip
    return labels


def deformable_detr():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    config = DeformableDetrConfig(backbone_config=backbone, num_feature_levels=3, d_model=32, encoder_layers=1,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
                                  num_labels=NUM_LABELS, auxiliary_loss=True, disable_custom_kernels=True)  # fmt: skip
    return DeformableDetrForObjectDetection(config), 64


def _rt_detr_config(config_class, backbone, in_channels, **overrides):
    return config_class(backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=in_channels,
                        feat_strides=[8, 16, 32], encoder_layers=1, encoder_ffn_dim=64, encoder_attention_heads=2,
                        d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, num_feature_levels=3,
                        decoder_attention_heads=2, num_labels=NUM_LABELS, disable_custom_kernels=True,
                        **overrides)  # fmt: skip


def rt_detr():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    hidden = [10, 20, 30, 40]
    backbone = RTDetrResNetConfig(embeddings_size=10, hidden_sizes=hidden, depths=[1, 1, 1, 1],
                                  out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])  # fmt: skip
    config = _rt_detr_config(RTDetrConfig, backbone, hidden[1:], decoder_n_points=4)
    return RTDetrForObjectDetection(config), 160  # 525 encoder tokens for the 300 proposals


def d_fine():
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config

    backbone = HGNetV2Config(stage_in_channels=[16, 64, 128, 256], stage_mid_channels=[16, 32, 64, 128],
                             stage_out_channels=[64, 128, 256, 512], stage_num_blocks=[1, 1, 1, 1],
                             stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
                             stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], embeddings_size=10,
                             hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                             out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
                             stem_channels=[3, 16, 16], use_lab=True)  # fmt: skip
    config = _rt_detr_config(DFineConfig, backbone, [128, 256, 512], decoder_n_points=[3, 6, 3], depth_mult=0.34,
                             hidden_expansion=0.5)  # fmt: skip
    return DFineForObjectDetection(config), 160


def rf_detr():
    from transformers import RfDetrConfig, RfDetrDinov2Config, RfDetrForObjectDetection

    backbone = RfDetrDinov2Config(num_attention_heads=2, num_hidden_layers=4, out_features=["stage2", "stage3"],
                                  hidden_size=32, patch_size=16, num_windows=2, image_size=384,
                                  mlp_ratio=4)  # fmt: skip
    config = RfDetrConfig(backbone_config=backbone, d_model=32, decoder_ffn_dim=32, decoder_self_attention_heads=2,
                          decoder_cross_attention_heads=4, num_labels=NUM_LABELS)  # fmt: skip
    return RfDetrForObjectDetection(config), 384  # 576 tokens for the 300 proposals of each group


MODELS = {"Deformable DETR": deformable_detr, "RT-DETR": rt_detr, "D-FINE": d_fine, "RF-DETR": rf_detr}


class Clock:
    """Milliseconds spent inside the wrapped calls since the last reset."""

    def __init__(self):
        self.ms = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms += (time.perf_counter() - start) * 1e3

        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def timed(model, matching: Clock, loss: Clock, device: str):
    """The matcher classes' forwards (transformers' and detr_fast's), detr_fast.loss.hungarian_match,
    detr_family.rt_detr_prefetch and the model's loss function timed into the clocks (a CUDA synchronize at both
    ends of each timed call on a GPU, so that the time is the work's)."""

    def synchronized(fn):
        if device != "cuda":
            return fn

        def call(*args, **kwargs):
            torch.cuda.synchronize()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return result

        return call

    with detr_family.batched_matchers():  # builds detr_fast's matcher subclasses
        batched = [getattr(__import__(m, fromlist=[n]), n) for m, n, _ in detr_family.REPLACEMENTS]
    originals = [getattr(__import__(m, fromlist=[n]), n) for m, n, _ in detr_family.REPLACEMENTS]
    classes = {cls for cls in originals + batched if "forward" in cls.__dict__}
    saved = {cls: cls.__dict__["forward"] for cls in classes}
    loss_function, match, prefetch = model.loss_function, detr_loss.hungarian_match, detr_family.rt_detr_prefetch
    try:
        for cls, forward in saved.items():
            cls.forward = matching.wrap(synchronized(forward))
        detr_loss.hungarian_match = matching.wrap(synchronized(match))  # FocalDetrLoss's matching: all layers
        detr_family.rt_detr_prefetch = matching.wrap(synchronized(prefetch))  # D-FINE's: all layers
        model.loss_function = loss.wrap(synchronized(loss_function))
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
        detr_loss.hungarian_match = match
        detr_family.rt_detr_prefetch = prefetch
        model.loss_function = loss_function


def family_rows(name: str, batch: int, device: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    unpatched, size = MODELS[name]()
    unpatched = unpatched.to(device).train()
    patched = patch(MODELS[name]()[0].to(device).train())
    patched.load_state_dict(unpatched.state_dict())
    pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    labels = labels_for(batch, device)
    models = {"transformers": unpatched, "detr_fast": patched}
    clocks = {impl: (Clock(), Clock()) for impl in models}

    def step(impl):
        model = models[impl]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the same denoising groups for both
        output = model(pixel_values=pixel_values, labels=[dict(label) for label in labels])
        output.loss.backward()
        return {k: float(v.detach()) for k, v in output.loss_dict.items()}

    losses = {impl: step(impl) for impl in models}  # warm-up, and the equality check
    same = losses["detr_fast"].keys() == losses["transformers"].keys() and all(
        abs(losses["detr_fast"][k] - v) <= 1e-5 * abs(v) + 1e-7 for k, v in losses["transformers"].items()
    )
    wall = {impl: [] for impl in models}
    cpu = {impl: [] for impl in models}
    matching_ms = {impl: [] for impl in models}
    loss_ms = {impl: [] for impl in models}
    for _ in range(repeats):
        for impl, model in models.items():
            matching, loss = clocks[impl]
            matching.ms = loss.ms = 0.0
            with timed(model, matching, loss, device):
                if device == "cuda":
                    torch.cuda.synchronize()
                cpu_start, start = time.thread_time(), time.perf_counter()
                step(impl)
                if device == "cuda":
                    torch.cuda.synchronize()
                wall[impl].append((time.perf_counter() - start) * 1e3)
                cpu[impl].append((time.thread_time() - cpu_start) * 1e3)
            matching_ms[impl].append(matching.ms)
            loss_ms[impl].append(loss.ms)
    unpatch(patched)
    queries = unpatched.config.num_queries * getattr(unpatched.config, "group_detr", 1)
    case = {"case": name, "B": batch, "queries": queries, "layers": unpatched.config.decoder_layers}
    rows = []
    for impl in models:
        timing = common.Timing(wall[impl], cpu[impl] if device == "cpu" else None)
        rows.append({**case, "impl": impl, **timing.columns(), "matching_ms": statistics.median(matching_ms[impl]),
                     "loss_ms": statistics.median(loss_ms[impl]), "same_loss": same})  # fmt: skip
    return rows


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    device = args.device
    repeats = args.repeats or (2 if args.quick else 5)
    batch = 4 if args.quick else 16
    info = common.environment(device)
    rows = []
    for name in MODELS:
        rows += family_rows(name, batch, device, repeats)
        print(f"{name}: done", flush=True)
    common.record_end_load(info)
    lines = []
    for name in MODELS:
        ours = common.row_of(rows, "detr_fast", case=name)
        theirs = common.row_of(rows, "transformers", case=name)
        ratio = theirs["matching_ms"] / ours["matching_ms"]
        noisy = common.noise(info, ours, theirs)[1]
        verdict = common.verdict(ratio >= 20 if device == "cpu" else None, noisy)
        lines.append(
            f"{verdict} {device}, {name} (B={ours['B']}, {ours['queries']} queries, {ours['layers']} layers): matching "
            f"{ours['matching_ms']:.1f} vs {theirs['matching_ms']:.1f} ms per step = {ratio:.1f}x (target 20x on the "
            f"CPU); loss {ours['loss_ms']:.0f} vs {theirs['loss_ms']:.0f} ms, step {ours['ms']:.0f} vs "
            f"{theirs['ms']:.0f} ms = {theirs['ms'] / ours['ms']:.2f}x; same loss dict: {ours['same_loss']}"
        )
    notes = "\n".join([TARGETS, "", *[f"- {line}" for line in lines]])
    common.write_results("detr_family", rows, info, args.out, notes)
    return common.report_targets(lines)


if __name__ == "__main__":
    sys.exit(main())
