"""Inference end to end: images in, detections out (COCO results and pictures), batched.

    detector = Detector.from_pretrained("runs/demo/model")          # or a training checkpoint, a transformers dir
    detections = detector(["a.jpg", "b.jpg"], threshold=0.7)        # per image: [{"score", "label", "box", ...}]

The model directory brings its image processor (preprocessor_config.json, ours or transformers') and its labels'
names and dataset category ids (config.json); a training checkpoint brings its run's evaluation resize.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

import torch
from PIL import Image, ImageDraw

from .model import DetrConfig, DetrPreTrainedModel, architecture_of, model_class
from .model.backbone import Backbone
from .model.weights import load_into, read_checkpoint
from .processing import DetrImageProcessor
from .processing.image_processor import CONFIG_NAME
from .runtime import autocast, autocast_dtype, resolve_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_model(path: str) -> tuple[DetrPreTrainedModel, DetrImageProcessor | None]:
    """The model and image processor of `path`: a training checkpoint (its run's model class and evaluation
    resize), or anything from_pretrained reads (the class its config.json names, else the detector) with the
    directory's preprocessor_config.json (None when it records none). In eval mode."""
    if os.path.isfile(path):
        from .train.checkpoint import NotATrainingCheckpoint, load_checkpoint

        try:
            state = load_checkpoint(path)  # a training checkpoint of another version or incomplete: its error
        except NotATrainingCheckpoint:
            state = None  # a weights file for from_pretrained
        if state is not None:
            cls = model_class(state["config"]["architecture"])
            model = cls.for_weights(DetrConfig.from_dict(state["model_config"]))
            load_into(model, state["model"], path)
            size, max_size = state["config"]["eval_size"], state["config"]["eval_max_size"]
            resize = {"shortest_edge": size or 800, "longest_edge": max_size}
            return model.eval(), DetrImageProcessor(do_resize=size is not None, size=resize)
    state_dict, config = read_checkpoint(path)
    model = model_class(architecture_of(config, state_dict)).from_pretrained(path)
    has_processor = os.path.isfile(os.path.join(path, CONFIG_NAME))
    return model, DetrImageProcessor.from_pretrained(path) if has_processor else None


def predict_batch_size(device: torch.device) -> int:
    """Images per forward pass by default: 1 on the CPU (a batch is padded to its largest image, which only adds
    work where the cores are busy anyway), 8 on a GPU."""
    return 8 if device.type == "cuda" else 1


def image_paths(source: str) -> list[str]:
    """The image files of `source`: itself, or the images of a folder (sorted). ValueError when there are none."""
    if os.path.isdir(source):
        paths = sorted(os.path.join(source, n) for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise FileNotFoundError(f"{source}: no such image or folder")
    if not paths:
        raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return paths


class Detector:
    """A model and its image processor, ready for images: decode, preprocess (batched), forward, post-process."""

    def __init__(
        self,
        model: DetrPreTrainedModel,
        processor: DetrImageProcessor | None = None,
        device: torch.device | str = "auto",
        amp: str = "auto",
    ):
        self.device = resolve_device(str(device))
        # The detector runs its own copy of the model, made for inference: frozen BatchNorm folded into the
        # convolutions (a pass over the activations fewer per convolution) and channels-last convolutions (faster
        # in oneDNN on the CPU and cuDNN on the GPU); the same outputs up to float rounding.
        model = copy.deepcopy(model).eval()
        for module in model.modules():
            if isinstance(module, Backbone):
                module.fold_batch_norm()
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.processor = processor or DetrImageProcessor()  # transformers' default: 800 / 1333
        self.amp_dtype = autocast_dtype(amp, self.device)

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | str = "auto", amp: str = "auto") -> Detector:
        return cls(*load_model(path), device=device, amp=amp)

    def label_name(self, label: int) -> str:
        names = self.model.config.id2label or {}
        return names.get(label, str(label))

    def category_id(self, label: int) -> int:
        """The dataset's category id of a label (the label itself when the model records none)."""
        ids = self.model.config.category_ids
        return ids[label] if ids is not None else label

    def __call__(
        self, images: Sequence[str | Image.Image], threshold: float = 0.5, batch_size: int | None = None
    ) -> list:
        """Per image, its detections above `threshold`: [{"score", "label" (the class name), "label_id",
        "category_id", "box": [x0, y0, x1, y1] in the image's pixels}], highest score first. Images are batched
        with others of similar shape (landscape with landscape), which keeps the padding of a batch small."""
        results: list = [None] * len(images)
        for chosen in self.batches(images, batch_size or predict_batch_size(self.device)):
            for i, detections in zip(chosen, self.detect_batch([images[i] for i in chosen], threshold)):
                results[i] = detections
        return results

    @staticmethod
    def batches(images: Sequence[str | Image.Image], batch_size: int) -> list[list[int]]:
        """The indices of `images` in batches of at most batch_size, images of similar aspect ratio together."""
        order = sorted(range(len(images)), key=lambda i: _aspect(images[i]))
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    @torch.no_grad()
    def detect_batch(self, images: Sequence[str | Image.Image], threshold: float) -> list:
        """The detections of one batch of images (see __call__)."""
        decoded = [_open(image) for image in images]
        inputs = self.processor(decoded, device=self.device)
        pixel_values = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(pixel_values, inputs.get("pixel_mask"))
        sizes = [(image.height, image.width) for image in decoded]
        detections = self.processor.post_process_object_detection(outputs, threshold, target_sizes=sizes)
        results = []
        for detection in detections:
            order = detection["scores"].argsort(descending=True).tolist()
            scores, labels, boxes = (detection[k].float().cpu() for k in ("scores", "labels", "boxes"))
            results.append(
                [
                    {
                        "score": round(float(scores[i]), 5),
                        "label": self.label_name(int(labels[i])),
                        "label_id": int(labels[i]),
                        "category_id": self.category_id(int(labels[i])),
                        "box": [round(v, 2) for v in boxes[i].tolist()],
                    }
                    for i in order
                ]
            )
        return results


def _aspect(image: str | Image.Image) -> float:
    """width / height, read from the file's header for a path (no decoding)."""
    if isinstance(image, Image.Image):
        return image.width / image.height
    with Image.open(image) as opened:
        return opened.width / opened.height


def _open(image: str | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def coco_results(detections: Iterable[dict], image_id: int | str) -> list[dict]:
    """One image's detections in COCO's results format: {"image_id", "category_id", "bbox": [x, y, w, h], "score"}."""
    return [
        {
            "image_id": image_id,
            "category_id": d["category_id"],
            "bbox": [*d["box"][:2], round(d["box"][2] - d["box"][0], 2), round(d["box"][3] - d["box"][1], 2)],
            "score": d["score"],
        }
        for d in detections
    ]


def draw_detections(image: Image.Image, detections: Iterable[dict]) -> Image.Image:
    """A copy of `image` with each detection's box and "label score" drawn."""
    drawn = image.convert("RGB").copy()
    draw = ImageDraw.Draw(drawn)
    palette = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
    for d in detections:
        colour = palette[d["label_id"] % len(palette)]
        draw.rectangle(d["box"], outline=colour, width=max(1, round(min(drawn.size) / 200)))
        draw.text((d["box"][0] + 2, d["box"][1] + 1), f"{d['label']} {d['score']:.2f}", fill=colour)
    return drawn
