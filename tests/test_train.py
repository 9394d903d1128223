"""The training loop: it learns, kernels and references give the same loss curve, a stopped or killed run resumes
exactly, two DDP processes compute the single-process gradients, checkpoints are atomic and bad ones are named,
the outputs (metrics, PNGs, weights) are written and `detr-fast eval` reproduces the run's metrics."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import detr_fast
from detr_fast.cli import main as cli_main
from detr_fast.data.collate import collate
from detr_fast.data.synthetic import CLASSES, SyntheticSpec, render_target
from detr_fast.data.transforms import ToModelInput
from detr_fast.model import DetrForObjectDetection
from detr_fast.runtime import setup_distributed
from detr_fast.train import (
    NotATrainingCheckpoint,
    StepBatchSampler,
    TrainConfig,
    WarmupStepSchedule,
    build_datasets,
    build_loader,
    build_model,
    build_optimizer,
    forward_backward,
    load_checkpoint,
    preset,
    rng_states,
    save_checkpoint,
    set_rng_states,
    train,
    train_step,
)

from .helpers import HAS_COCO, tiny_config

needs_coco = pytest.mark.skipif(not HAS_COCO, reason="needs pycocotools")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """train() sets the process's thread count (cfg.threads); the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def losses(history):
    return [record["loss"] for record in history if "loss" in record]


def test_a_tiny_run_learns(tmp_path, device):
    cfg = tiny_config(
        tmp_path, device, steps=40, synthetic_train_images=8, batch_size=4, log_every=5, model={"dropout": 0.0}
    )
    curve = losses(train(cfg)["history"])
    assert len(curve) == 8
    assert curve[-1] < 0.75 * curve[0] and curve[-1] < min(curve[:4]), curve


def shape_batches(count: int, batch_size: int, size: int) -> list[dict]:
    """Collated batches of synthetic shapes, straight from the generator (no files, no pycocotools)."""
    spec = SyntheticSpec(min_size=size, max_size=size, max_objects=3, min_object_fraction=0.25)
    return [
        collate(
            [ToModelInput()(*render_target(b * batch_size + i, seed=5, spec=spec), None) for i in range(batch_size)],
            max_targets=3,
        )
        for b in range(count)
    ]


def step_losses(cfg: TrainConfig, batches: list[dict], device, amp_dtype=None) -> list[float]:
    """The losses of train_step over `batches`, from the weights build_model gives for cfg.seed."""
    model = build_model(cfg, list(CLASSES)).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepSchedule(cfg.warmup_steps, 10**9, 0.1))
    return [
        float(train_step(model, batch, optimizer, scheduler, cfg.clip_max_norm, device, amp_dtype)[0])
        for batch in batches
    ]


@pytest.mark.parametrize("fast", ["auto", "kernel"])
def test_kernels_and_references_give_the_same_loss_curve(tmp_path, device, fast):
    # On CUDA "auto" takes the Triton kernels and the CUDA solver; on the CPU it takes the C++ solver where it is
    # built, and "kernel" runs the Triton kernels in Triton's interpreter (hence 32-pixel images: 16 tokens).
    cfg = tiny_config(tmp_path, device, model={"dropout": 0.0})
    batches = shape_batches(6 if device.type == "cuda" else 2, batch_size=2, size=32)
    with detr_fast.backend("reference"):
        reference = step_losses(cfg, batches, device)
    try:
        with detr_fast.backend(fast):
            fast_curve = step_losses(cfg, batches, device)
    except RuntimeError as error:
        if fast == "kernel" and "DETR_FAST_BACKEND=kernel" in str(error):
            pytest.skip(f"no fast path for every op on {device}: {error}")
        raise
    assert fast_curve == pytest.approx(reference, rel=1e-3), (fast_curve, reference)
    assert fast_curve[-1] != fast_curve[0]  # the steps changed the weights


def test_stop_and_resume_continues_exactly(tmp_path):
    whole = losses(train(tiny_config(tmp_path / "a", steps=8))["history"])
    cfg = tiny_config(tmp_path / "b", steps=8)
    first = train(cfg, stop_after=3)
    assert first["steps"] == 3 and losses(first["history"]) == whole[:3]
    resumed = train(cfg, resume="auto")
    assert resumed["steps"] == 8
    assert losses(resumed["history"]) == whole  # exactly: same batches, same dropout masks, same optimizer state


def test_a_killed_run_resumes_exactly(tmp_path):
    whole = losses(train(tiny_config(tmp_path / "a", steps=12))["history"])
    root = tmp_path / "b"
    script = (
        f"import sys; sys.path.insert(0, {REPO!r}); from tests.helpers import tiny_config; "
        f"from detr_fast.train import train; train(tiny_config({str(root)!r}, steps=12, checkpoint_every=2))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    checkpoint = root / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert running and checkpoint.exists(), f"the run ended before its first checkpoint: {stderr.decode()[-2000:]}"
    killed_at = load_checkpoint(str(checkpoint))["step"]
    assert 2 <= killed_at < 12
    resumed = train(tiny_config(root, steps=12, checkpoint_every=2), resume="auto")
    assert losses(resumed["history"]) == whole


def test_training_runs_without_pycocotools(tmp_path):
    """The GPU machine has no pycocotools: a run with evaluate=False reads the COCO files and trains without it, and
    one that evaluates says what is missing."""
    root = str(tmp_path)
    script = f"""
import sys
sys.modules["pycocotools"] = None  # import pycocotools fails as where it is not installed
sys.path.insert(0, {REPO!r})
import os
from tests.helpers import tiny_config
from detr_fast.train import train
result = train(tiny_config({root!r}, steps=2, evaluate=False))
assert result["steps"] == 2 and result["metrics"] == {{}}, result
import importlib.util
pictures = ["curves.png", "detections.png"] if importlib.util.find_spec("matplotlib") else []  # the PNGs need it
assert sorted(os.listdir(os.path.join({root!r}, "run"))) == sorted(["checkpoint.pt", "history.json", "model",
                                                                    *pictures])
try:
    train(tiny_config({root!r} + "/evaluating", steps=1, evaluate=True))
except ImportError as error:
    assert "needs pycocotools" in str(error), error
else:
    raise AssertionError("evaluating without pycocotools did not raise")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_resume_after_a_batch_skipped_whole(tmp_path):
    """With on_bad="skip", a batch whose every image is unreadable is skipped without a step; a resumed run still
    continues at the right batch (the checkpoint keeps the sampler position apart from the step count)."""

    def config(name):
        return tiny_config(
            tmp_path / name,
            steps=5,
            batch_size=1,
            on_bad="skip",
            data_dir=str(tmp_path / "data"),
            flip=0.0,
            model={"dropout": 0.0},
        )

    train_set, _ = build_datasets(config("whole"))
    first_epoch = [batch[0] for batch in StepBatchSampler(len(train_set), 1, config("whole").seed)]
    with open(train_set.images[first_epoch[1]]["path"], "wb") as f:
        f.write(b"not a png")  # the second batch of the run is skipped whole
    whole = losses(train(config("whole"))["history"])
    assert len(whole) == 5
    stopped = train(config("stopped"), stop_after=3)
    assert losses(stopped["history"]) == whole[:3]
    assert losses(train(config("stopped"), resume="auto")["history"]) == whole


@needs_coco
def test_checkpoints_are_atomic_and_bad_ones_are_named(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, steps=2)
    train(cfg)
    path = os.path.join(cfg.output_dir, "checkpoint.pt")
    good = open(path, "rb").read()

    def dies_mid_write(state, file):
        file.write(b"partial")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": "anything"})
    monkeypatch.undo()
    assert open(path, "rb").read() == good  # the old checkpoint is untouched
    assert sorted(os.listdir(cfg.output_dir)) == [
        "checkpoint.pt",
        "curves.png",
        "detections.png",
        "history.json",
        "metrics.json",
        "model",
    ]  # and no temporary file is left
    assert load_checkpoint(path)["step"] == 2

    bad = tmp_path / "bad.pt"
    for content, message in (
        (good[: len(good) // 2], "corrupt or not a torch checkpoint"),
        (b"garbage", "corrupt or not a torch checkpoint"),
    ):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as error:
            load_checkpoint(str(bad))
        assert str(bad) in str(error.value)
    torch.save({"model": {}}, bad)
    with pytest.raises(NotATrainingCheckpoint, match="not a detr_fast training checkpoint"):
        load_checkpoint(str(bad))
    # A training checkpoint of another format version is named as such, also by `detr-fast eval` (which reads
    # files that are no training checkpoint as weights).
    torch.save({**torch.load(path, weights_only=True), "format": "detr_fast-train-1"}, bad)
    with pytest.raises(ValueError, match="format 'detr_fast-train-1', expected") as error:
        load_checkpoint(str(bad))
    assert not isinstance(error.value, NotATrainingCheckpoint)
    with pytest.raises(ValueError, match="format 'detr_fast-train-1', expected"):
        cli_main(["eval", "--debug", str(bad), "--images", "x", "--annotations", "y.json"])
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        train(cfg, resume=str(tmp_path / "nothing.pt"))
    with pytest.raises(ValueError, match=r"from a different run: lr: checkpoint 0\.001, now 0\.002"):
        train(dataclasses.replace(cfg, lr=2e-3, steps=4), resume=path)
    with pytest.raises(ValueError, match="from a different run: model"):
        train(dataclasses.replace(cfg, model={**cfg.model, "d_model": 64}), resume=path)


@needs_coco
def test_outputs_and_eval_command(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=3)
    result = train(cfg)
    run = cfg.output_dir
    for name in (
        "metrics.json",
        "history.json",
        "curves.png",
        "detections.png",
        "checkpoint.pt",
        "model/config.json",
        "model/model.safetensors",
    ):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == result["metrics"] and {"map", "map50", "mar_100"} <= set(metrics)
    assert [r["step"] for r in result["history"] if "map" in r] == [3]

    data = cfg.data_dir
    args = [
        "--images",
        os.path.join(data, "val"),
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--annotations",
        os.path.join(data, "annotations", "instances_val.json"),
    ]
    for model in (os.path.join(run, "checkpoint.pt"), os.path.join(run, "model")):
        out = str(tmp_path / "eval.json")
        assert cli_main(["eval", model, *args, "--out", out]) == 0
        with open(out) as f:
            assert json.load(f) == metrics
    assert "mAP" in capsys.readouterr().out
    loaded = DetrForObjectDetection.from_pretrained(os.path.join(run, "model"))
    assert loaded.config.id2label == {0: "rectangle", 1: "ellipse", 2: "triangle", 3: "cross"}


def test_time_budget_sets_the_step_count(tmp_path):
    cfg = tiny_config(tmp_path, steps=None, time_budget=3.0, calibration_steps=2)
    result = train(cfg)
    steps = result["steps"]
    assert steps >= 4 and result["config"].steps == steps
    stored = load_checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt"))
    assert stored["config"]["steps"] == steps
    assert stored["scheduler"]["lr_lambdas"][0]["drop_step"] == int(cfg.lr_drop * steps)


def test_schedule_and_sampler():
    schedule = WarmupStepSchedule(warmup_steps=4, drop_step=10, drop_factor=0.1)
    assert [schedule(s) for s in (0, 3, 4, 9, 10, 20)] == [0.25, 1.0, 1.0, 1.0, 0.1, 0.1]
    sampler = StepBatchSampler(num_images=10, batch_size=2, seed=0, rank=1, world_size=2)
    assert sampler.steps_per_epoch == 2
    ranks = [list(StepBatchSampler(10, 2, 0, rank, 2)) for rank in (0, 1)]
    single = list(StepBatchSampler(10, 4, 0))
    assert [a + b for a, b in zip(*ranks)] == single  # the processes split the single-process batches
    sampler.set_epoch(0, start=1)
    assert list(sampler) == ranks[1][1:]
    sampler.set_epoch(1)
    assert list(sampler) != ranks[1]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(3, 2, 0, world_size=2)


def test_presets():
    synthetic = preset("synthetic", seed=5, model={"d_model": 64})
    assert synthetic.seed == 5 and synthetic.model["d_model"] == 64 and synthetic.model["num_queries"] == 6
    coco = preset("coco-r50")
    assert coco.epochs == 500 and coco.lr == 1e-4 and coco.lr_backbone_multiplier == 0.1 and coco.clip_max_norm == 0.1
    assert coco.model["backbone"] == "resnet50" and coco.model["auxiliary_loss"]
    with pytest.raises(ValueError, match="unknown preset 'coco'"):
        preset("coco")
    with pytest.raises(ValueError, match="needs --train-images"):
        build_datasets(preset("coco-r50"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_batch_gradients(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Gradients of the first training batch, computed as train() computes them (DDP when WORLD_SIZE > 1)."""
    rank, world_size, device = setup_distributed("cpu")
    torch.set_num_threads(1)
    train_set, _ = build_datasets(cfg)
    model = build_model(cfg, train_set.category_names)
    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world_size)
    batch = next(iter(build_loader(train_set, sampler, cfg, device)))
    step_model = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    forward_backward(step_model, batch, device, None)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    cfg = _ddp_config(root, batch_size=2)
    gradients = _first_batch_gradients(cfg)
    result = train(dataclasses.replace(cfg, steps=2))  # the whole loop: sampler shards, all-reduces, evaluation
    torch.save({"gradients": gradients, "metrics": result["metrics"]}, os.path.join(root, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _ddp_config(root, batch_size):
    # Equal image sizes (so padding is the same with 2 or 4 images to a batch) and eos_coefficient 1 (so the
    # classification loss is a plain mean, equal to the mean of the processes' means); the number of boxes per
    # image varies, so the box losses match only if num_boxes is all-reduced.
    return tiny_config(
        root,
        batch_size=batch_size,
        scales=(),
        flip=0.0,
        model={"dropout": 0.0, "eos_coefficient": 1.0},
        synthetic_spec={"min_size": 64, "max_size": 64, "max_objects": 3, "min_objects": 1},
    )


def test_ddp_on_two_processes_matches_one(tmp_path):
    root = str(tmp_path)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), root), nprocs=2, start_method="spawn")
    single = _first_batch_gradients(_ddp_config(root, batch_size=4))
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    assert len(single) > 50 and sum(g.numel() for g in single.values()) > 10_000
    # Gradients that are zero up to rounding (the key-projection bias: softmax cancels it) are compared on the
    # scale of the largest gradient, not on their own.
    floor = 1e-3 * max(g.abs().max().item() for g in single.values())
    for name, gradient in single.items():
        for rank in ranks:
            scale = max(gradient.abs().max().item(), floor)
            assert (rank["gradients"][name] - gradient).abs().max().item() / scale < 1e-4, name
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ("map50" in ranks[0]["metrics"]) == HAS_COCO


def _ddp_resume_worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    # Dropout on: after a resume each process must draw its own masks again, not rank 0's. LayerDrop on: every
    # process skips the same layers, and DDP accepts the parameters a skipped layer leaves without gradient.
    layerdrop = {"encoder_layerdrop": 0.5, "decoder_layerdrop": 0.5}
    whole = train(tiny_config(os.path.join(root, "whole"), steps=6, batch_size=2, model=layerdrop))
    cfg = tiny_config(os.path.join(root, "stopped"), steps=6, batch_size=2, model=layerdrop)
    stopped = train(cfg, stop_after=3)
    resumed = train(cfg, resume="auto")
    torch.save(
        {
            name: losses(result["history"])
            for name, result in (("whole", whole), ("stopped", stopped), ("resumed", resumed))
        },
        os.path.join(root, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def test_ddp_stop_and_resume_continues_exactly(tmp_path):
    root = str(tmp_path)
    torch.multiprocessing.start_processes(
        _ddp_resume_worker, args=(2, _free_port(), root), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    whole = ranks[0]["whole"]
    assert len(whole) == 6 and ranks[1]["whole"] == whole  # the logged losses are means over both processes
    for curves in ranks:
        assert curves["stopped"] == whole[:3]
        assert curves["resumed"] == whole, curves


def test_a_checkpoint_resumes_only_with_as_many_processes(tmp_path):
    with pytest.raises(ValueError, match="written by 2 process"):
        set_rng_states([rng_states()[0]] * 2, rank=0, world_size=1, path="ckpt.pt")


@pytest.mark.cuda
def test_the_cuda_step_has_no_host_sync(tmp_path, device):
    if device.type != "cuda":
        pytest.skip("needs CUDA: torch.cuda.set_sync_debug_mode checks device-to-host syncs")
    cfg = tiny_config(tmp_path, device)
    model = build_model(cfg, list(CLASSES)).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepSchedule(2, 100, 0.1))
    batch = shape_batches(1, batch_size=4, size=64)[0]
    batch = {
        **batch,
        "pixel_values": batch["pixel_values"].to(device),
        "pixel_mask": batch["pixel_mask"].to(device),
        "labels": {k: v.to(device) for k, v in batch["labels"].items()},
    }
    for dtype in (None, torch.bfloat16):
        train_step(model, batch, optimizer, scheduler, cfg.clip_max_norm, device, dtype)  # warm-up: lazy inits
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, loss_dict, status = train_step(model, batch, optimizer, scheduler, cfg.clip_max_norm, device, dtype)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss) and int(status.sum()) == 0
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_bf16_training_on_cuda_tracks_fp32(tmp_path, device):
    if device.type != "cuda":
        pytest.skip("needs CUDA: bf16 autocast is the CUDA training precision")
    cfg = tiny_config(tmp_path, device, model={"dropout": 0.0})
    batches = shape_batches(8, batch_size=4, size=64)
    fp32 = step_losses(cfg, batches, device)
    bf16 = step_losses(cfg, batches, device, torch.bfloat16)
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    assert fp32[-1] < fp32[0]
