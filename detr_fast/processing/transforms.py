"""The pixel operations of DETR's preprocessing, on tensors, shared by the image processor, the training data
pipeline and evaluation: decode to a uint8 [3, H, W] tensor, the output size of a resize, the resize itself
(torchvision's antialiased resize, as transformers' DetrImageProcessor runs it), and normalize + pad of a batch in
one pass into its padded buffer.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's resampling filters (what preprocessor_config.json stores) -> torchvision's.
RESAMPLE = {
    int(Image.Resampling.NEAREST): tvF.InterpolationMode.NEAREST_EXACT,
    int(Image.Resampling.BILINEAR): tvF.InterpolationMode.BILINEAR,
    int(Image.Resampling.BICUBIC): tvF.InterpolationMode.BICUBIC,
}


def to_uint8_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """An RGB image as a [3, H, W] tensor: PIL images and [H, W, 3] / [H, W] arrays (uint8, or floats in [0, 1]
    kept as floats) become channels-first views where possible (no copy of a contiguous array), tensors pass
    through (a [H, W, 3] tensor is made channels-first). Grayscale becomes three channels, RGBA loses alpha."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # a decoded image's buffer is read-only; nothing here writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            image = torch.from_numpy(np.ascontiguousarray(image))
        if image.dim() == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            image = image.permute(2, 0, 1)  # [H, W, C] -> a [C, H, W] view
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"an image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise ValueError(f"an image must be [C, H, W] or [H, W, C], got shape {tuple(image.shape)}")
    if image.shape[0] not in (1, 3, 4) and image.shape[-1] in (1, 3, 4):
        image = image.permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    elif image.shape[0] != 3:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    return image


def resized_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """The (height, width) a resize to `size` gives, by transformers' DetrImageProcessor rules:
    {"shortest_edge", "longest_edge"}: the shorter side becomes shortest_edge unless the longer would then pass
    longest_edge, in which case the longer side is about longest_edge (aspect ratio kept, sides truncated);
    {"height", "width"}: exactly that; {"max_height", "max_width"}: the largest size within both, aspect kept."""
    if size.get("shortest_edge"):
        shortest, longest = size["shortest_edge"], size.get("longest_edge")
        raw = None
        if longest is not None:
            short, long = float(min(height, width)), float(max(height, width))
            if long / short * shortest > longest:
                raw = longest * short / long
                shortest = int(round(raw))
        if (height <= width and height == shortest) or (width <= height and width == shortest):
            return height, width
        if width < height:
            return int((raw if raw is not None else shortest) * height / width), shortest
        return shortest, int((raw if raw is not None else shortest) * width / height)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    if size.get("max_height") and size.get("max_width"):
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    raise ValueError(
        f"size must be {{shortest_edge, longest_edge}}, {{height, width}} or {{max_height, max_width}}, got {size}"
    )


def resize(
    image: torch.Tensor, height: int, width: int, resample: int = int(Image.Resampling.BILINEAR)
) -> torch.Tensor:
    """image [..., C, H, W] (uint8 or float) resized to [..., C, height, width] by torchvision with antialiasing,
    the operation transformers' DetrImageProcessor runs (so the pixels are the same)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if resample not in RESAMPLE:
        raise ValueError(
            f"resample must be one of PIL's NEAREST, BILINEAR, BICUBIC ({sorted(RESAMPLE)}), got {resample}"
        )
    return tvF.resize(image, [height, width], interpolation=RESAMPLE[resample], antialias=True)


def normalize_and_pad(
    images: Sequence[torch.Tensor],
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    rescale_factor: float | None = 1 / 255,
    pad_size: tuple[int, int] | None = None,
    size_divisor: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale, normalize and pad images of different sizes into one batch, each written once into its place.

    Args:
        images: [C, H_i, W_i] tensors (uint8 or float) on one device.
        mean, std: per-channel normalization after the rescale (None: no normalization).
        rescale_factor: multiplies the pixel values first (None: none; 1/255 maps uint8 to [0, 1]).
        pad_size: (height, width) of the batch (default: the largest image's, rounded up to size_divisor).
    Returns:
        pixel_values [B, C, H, W] float32 (the images' float dtype when only padding) with zeros in the padding,
        and pixel_mask [B, H, W] int64 (1 = real pixel).
    """
    if not images:
        raise ValueError("normalize_and_pad: got no images")
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    if pad_size is not None:
        if pad_size[0] < height or pad_size[1] < width:
            raise ValueError(f"pad_size {tuple(pad_size)} is smaller than the largest image ({height}, {width})")
        height, width = pad_size
    height, width = -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor
    device = images[0].device
    # float32, or a float image's own dtype when there is nothing to rescale or normalize (padding only).
    plain = mean is None and rescale_factor is None and images[0].is_floating_point()
    dtype = images[0].dtype if plain else torch.float32
    pixel_values = batch_buffer((len(images), images[0].shape[0], height, width), dtype, device)
    pixel_mask = batch_buffer((len(images), height, width), torch.int64, device)
    # transformers' fused rescale and normalize, to the bit: (x - mean * (1 / rescale)) / (std * (1 / rescale)).
    scale = 1.0 if rescale_factor is None else 1.0 / rescale_factor
    shift = None if mean is None else (torch.tensor(mean, device=device) * scale)[:, None, None]
    divide = None if std is None else (torch.tensor(std, device=device) * scale)[:, None, None]
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        target = pixel_values[i, :, :h, :w]
        # one pass converts (uint8 -> float32, channels-last -> first), then in place on the contiguous target:
        # faster than a sub that converts as it goes, and the same values
        target.copy_(image)
        if shift is not None:
            target.sub_(shift).div_(divide)
        elif rescale_factor is not None:
            target.mul_(rescale_factor)
        pixel_values[i, :, h:, :] = 0
        pixel_values[i, :, :h, w:] = 0
        pixel_mask[i, :h, :w] = 1
        pixel_mask[i, h:, :] = 0
        pixel_mask[i, :h, w:] = 0
    return pixel_values, pixel_mask


_ALIGNMENT = 64  # bytes, as torch's CPU allocator


class _HostBuffers:
    """Large CPU buffers, one per use and dtype, reused once nothing references the last tensor made in them.

    A fresh 100 MB batch costs more in page faults and the kernel's zeroing of new pages than in pixel work, and a
    loop that preprocesses batch after batch drops each before making the next. The pool hands out views of a flat
    numpy array (numpy asks the kernel for transparent huge pages for it); the array is reused when its only
    reference is the pool's, that is when no tensor or view of a batch made in it is alive, and replaced by a larger
    one when a batch outgrows it. It holds the largest batch's memory for the life of the process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._arrays: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype, use: str) -> np.ndarray:
        """An uninitialized array of `shape` and `dtype` from the buffer of `use` (what the memory is for: uses that
        live at the same time, as a batch and its post-processing, keep their own buffers)."""
        size = math.prod(shape)
        with self._lock:
            array = self._arrays.get((use, dtype))
            pad = _ALIGNMENT // np.dtype(dtype).itemsize  # room to start at an aligned element
            # 3 references (the dict, `array`, getrefcount's argument): no tensor made in it is alive
            if array is None or array.size < size + pad or sys.getrefcount(array) > 3:
                array = np.empty(max(size, 1) + pad, dtype=dtype)
                self._arrays[(use, dtype)] = array
            # aligned to a cache line as torch's allocator aligns: MKL's GEMM writing to numpy's 16-byte alignment
            # ran at two thirds of its speed
            start = (-array.ctypes.data % _ALIGNMENT) // array.itemsize
            return array[start : start + size].reshape(shape)


_HOST_BUFFERS = _HostBuffers()
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64}


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, use: str = "batch") -> torch.Tensor:
    """An uninitialized tensor of `shape` to be written into, every element once: on the CPU from _HostBuffers (the
    memory of an earlier tensor of the same `use` that nothing references any more), elsewhere torch.empty."""
    if torch.device(device).type == "cpu" and dtype in NUMPY_DTYPES:
        return torch.from_numpy(_HOST_BUFFERS.take(shape, np.dtype(NUMPY_DTYPES[dtype]), use))
    return torch.empty(shape, dtype=dtype, device=device)
