"""`detr-fast demo | convert`: the command-line entry points."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .data.collate import image_to_tensor, pad_images
from .data.synthetic import CLASSES, render
from .model import DetrConfig, DetrForObjectDetection
from .model.weights import LAYOUTS, from_detr_fast, read_checkpoint, save_pretrained


def demo(args: argparse.Namespace) -> int:
    """Inference of a random-weight DETR on built-in synthetic images: detections and timing."""
    torch.manual_seed(args.seed)
    config = DetrConfig(
        backbone="resnet18", num_labels=len(CLASSES), d_model=128, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        num_queries=20, id2label=dict(enumerate(CLASSES)),
    )
    model = DetrForObjectDetection(config).eval()
    images = [render(i, seed=args.seed)[0] for i in range(args.images)]
    pixel_values, pixel_mask = pad_images([image_to_tensor(image) for image in images])
    sizes = [(image.height, image.width) for image in images]
    with torch.inference_mode():
        model(pixel_values, pixel_mask)  # warm-up
        start = time.perf_counter()
        outputs = model(pixel_values, pixel_mask)
        elapsed = time.perf_counter() - start
    detections = model.post_process_object_detection(outputs, threshold=args.threshold, target_sizes=sizes)
    print(f"detr_fast demo: random-weight DETR ({config.backbone}, d_model {config.d_model}) on {len(images)} "
          f"synthetic images {tuple(pixel_values.shape[-2:])}: {elapsed * 1e3:.1f} ms per batch on "
          f"{pixel_values.device}, {len(images) / elapsed:.1f} images/s")
    for index, result in enumerate(detections):
        order = result["scores"].argsort(descending=True)[: args.show]
        shown = ", ".join(
            f"{config.id2label[int(result['labels'][i])]} {result['scores'][i]:.2f} "
            f"[{', '.join(f'{v:.0f}' for v in result['boxes'][i].tolist())}]"
            for i in order
        )
        print(f"  image {index} {sizes[index]}: {len(result['scores'])} detections above {args.threshold}; "
              f"top {len(order)}: {shown}")
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between detr_fast, transformers (v4/v5 keys) and facebookresearch/detr layouts."""
    state_dict, config = read_checkpoint(args.src)
    if args.layout == "detr_fast":
        if config is None:
            raise SystemExit(f"convert: {args.src} stores no config to write beside the weights; "
                             "give a directory with config.json")
        model = DetrForObjectDetection(config)
        from .model.weights import load_into

        load_into(model, state_dict, args.src)
        save_pretrained(model, args.dst)
    elif args.layout == "original":
        torch.save({"model": from_detr_fast(state_dict, "original")}, args.dst)
    else:
        from safetensors.torch import save_file

        os.makedirs(args.dst, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in from_detr_fast(state_dict, args.layout).items()}
        save_file(tensors, os.path.join(args.dst, "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            config.to_transformers().to_json_file(os.path.join(args.dst, "config.json"))
    print(f"wrote {args.dst} ({args.layout}, {len(state_dict)} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="run DETR on built-in synthetic images and print detections and timing")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=3, help="detections printed per image")
    p.set_defaults(run=demo)

    p = commands.add_parser("convert", help="convert a checkpoint between weight layouts")
    p.add_argument("src", help="checkpoint file or directory (detr_fast, transformers v4/v5, or original DETR .pth)")
    p.add_argument("dst", help="output directory (detr_fast, transformers) or .pth file (original)")
    p.add_argument("--layout", choices=LAYOUTS, default="detr_fast",
                   help="target layout (transformers-v4 keys; detr_fast is also transformers v5's)")
    p.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
