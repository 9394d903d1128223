"""Weight layouts (transformers v4/v5, facebookresearch/detr), safetensors checkpoints and their errors."""

import argparse

import pytest
import torch
from torch import nn

from detr_fast import DetrConfig, DetrForObjectDetection
from detr_fast.cli import main as cli_main
from detr_fast.model.weights import detect_layout, from_detr_fast, infer_config, read_checkpoint, to_detr_fast

from ..helpers import padded_batch, relative_error, tiny_config_kwargs

pytestmark = pytest.mark.transformers  # the layouts of transformers v4 and v5


def tiny_model(device, **overrides) -> DetrForObjectDetection:
    kwargs = tiny_config_kwargs(**overrides)
    kwargs.pop("use_timm_backbone")
    return DetrForObjectDetection(DetrConfig(**kwargs)).to(device).eval()


def outputs(model, batch):
    with torch.no_grad():
        out = model(*batch)
    return out.logits, out.pred_boxes


@pytest.mark.parametrize("layout", ["transformers-v4", "original", "detr_fast"])
def test_layout_round_trip_is_exact(device, layout):
    model = tiny_model(device, position_embedding_type="learned")
    state_dict = model.state_dict()
    converted = from_detr_fast(state_dict, layout)
    assert detect_layout(converted) == layout
    back = to_detr_fast(converted)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(back[key], value), key


def test_v4_key_names():
    keys = from_detr_fast(
        dict.fromkeys(
            [
                "model.backbone.model.layer2.0.conv1.weight",
                "model.position_embedding.row_embeddings.weight",
                "model.encoder.layers.0.self_attn.o_proj.weight",
                "model.decoder.layers.1.encoder_attn.o_proj.bias",
                "model.decoder.layers.1.mlp.fc2.weight",
            ]
        ),
        "transformers-v4",
    )
    assert list(keys) == [
        "model.backbone.conv_encoder.model.layer2.0.conv1.weight",
        "model.backbone.position_embedding.row_embeddings.weight",
        "model.encoder.layers.0.self_attn.out_proj.weight",
        "model.decoder.layers.1.encoder_attn.out_proj.bias",
        "model.decoder.layers.1.fc2.weight",
    ]


def test_original_in_proj_split_matches_nn_multihead_attention(device):
    """The original checkpoint's fused in_proj must split into q, k, v in nn.MultiheadAttention's order."""
    model = tiny_model(device)
    original = from_detr_fast(model.state_dict(), "original")
    prefix = "transformer.encoder.layers.0.self_attn."
    attention = nn.MultiheadAttention(64, 4, batch_first=True).to(device).eval()
    attention.load_state_dict({k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix)})
    layer = model.model.encoder.layers[0].self_attn
    x, pos = torch.randn(2, 9, 64, device=device), torch.randn(2, 9, 64, device=device)
    with torch.no_grad():
        expected, _ = attention(x + pos, x + pos, x)
        got, _ = layer(x, pos)  # (output, attention weights or None)
    assert relative_error(got, expected) < 1e-5
    assert {k for k in original if "norm" in k and "decoder.layers.0" in k} == {
        f"transformer.decoder.layers.0.norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    }


def test_save_and_load_safetensors(device, tmp_path):
    model = tiny_model(device, auxiliary_loss=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DetrForObjectDetection.from_pretrained(str(tmp_path / "ckpt")).to(device).eval()
    assert loaded.config == model.config
    batch = padded_batch(device)
    for a, b in zip(outputs(model, batch), outputs(loaded, batch)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("aux_loss", [False, True])
def test_original_checkpoint_with_args_loads_weights_only(device, tmp_path, aux_loss):
    # With aux loss the original decoder feeds raw outputs on, transformers' feeds normed ones: the loaded model
    # must run the original's forward.
    model = tiny_model(device, backbone="resnet50", original_detr=True, auxiliary_loss=aux_loss)
    args = argparse.Namespace(nheads=4, dilation=False, aux_loss=aux_loss, dropout=0.0, backbone="resnet50")
    path = tmp_path / "detr-original.pth"
    torch.save({"model": from_detr_fast(model.state_dict(), "original"), "args": args, "epoch": 3}, path)
    loaded = DetrForObjectDetection.from_pretrained(str(path)).to(device).eval()
    assert loaded.config.original_detr and loaded.config.auxiliary_loss == aux_loss
    assert loaded.config.backbone == "resnet50" and loaded.config.encoder_attention_heads == 4
    assert loaded.config.num_queries == 12 and loaded.config.num_labels == 7
    batch = padded_batch(device)
    for a, b in zip(outputs(model, batch), outputs(loaded, batch)):
        assert relative_error(a, b) < 1e-6


def test_loading_builds_the_class_that_asks_and_the_class_a_checkpoint_names(device, tmp_path):
    """from_pretrained builds `cls` (a segmentation model will load as one); config.json records the class that
    saved it, and evaluation and conversion build that class."""
    from detr_fast.cli import load_for_eval
    from detr_fast.model import ARCHITECTURES

    class TaggedDetector(DetrForObjectDetection):
        pass

    model = tiny_model(device)
    model.save_pretrained(tmp_path / "plain")
    assert type(TaggedDetector.from_pretrained(str(tmp_path / "plain"))) is TaggedDetector
    assert type(load_for_eval(str(tmp_path / "plain"))[0]) is DetrForObjectDetection
    tagged = TaggedDetector(model.config)
    tagged.save_pretrained(tmp_path / "tagged")
    assert read_checkpoint(str(tmp_path / "tagged"))[1].architectures == ["TaggedDetector"]
    with pytest.raises(ValueError, match="unknown architecture 'TaggedDetector'; detr_fast has DetrForObjectDetection"):
        load_for_eval(str(tmp_path / "tagged"))
    ARCHITECTURES["TaggedDetector"] = TaggedDetector
    try:
        assert type(load_for_eval(str(tmp_path / "tagged"))[0]) is TaggedDetector
    finally:
        del ARCHITECTURES["TaggedDetector"]


def test_loading_weights_downloads_no_backbone(device, tmp_path, monkeypatch):
    """A config asking for ImageNet backbone weights (hub configs, the coco-r50 preset) loads stored weights without
    fetching those it would overwrite, and keeps asking for them."""
    import timm

    model = tiny_model(device, use_pretrained_backbone=False)
    model.config.use_pretrained_backbone = True
    model.save_pretrained(tmp_path / "ckpt")
    requested = []
    create_model = timm.create_model

    def spy(*args, **kwargs):
        requested.append(kwargs["pretrained"])
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    loaded = DetrForObjectDetection.from_pretrained(str(tmp_path / "ckpt"))
    assert requested == [False] and loaded.config.use_pretrained_backbone


def test_infer_config_from_shapes(device):
    model = tiny_model(device, position_embedding_type="learned")
    config = infer_config(model.state_dict(), encoder_attention_heads=4, decoder_attention_heads=4)
    for field in (
        "d_model",
        "num_queries",
        "encoder_layers",
        "decoder_layers",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "num_labels",
        "position_embedding_type",
        "backbone",
    ):
        assert getattr(config, field) == getattr(model.config, field), field
    with pytest.warns(UserWarning, match=r"assuming DETR's default \(8\)"):
        assert infer_config(model.state_dict()).encoder_attention_heads == 8


def test_missing_and_unexpected_keys_are_named(device, tmp_path):
    model = tiny_model(device)
    state_dict = model.state_dict()
    del state_dict["class_labels_classifier.bias"]
    state_dict["model.extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file

    model.config.save(tmp_path / "config.json")
    save_file({k: v.contiguous().cpu() for k, v in state_dict.items()}, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"1 missing keys: class_labels_classifier\.bias.*1 unexpected keys: model\.extra\.weight"
    ):
        DetrForObjectDetection.from_pretrained(str(tmp_path))


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="broken.pth: not a loadable weights-only torch checkpoint"):
        read_checkpoint(corrupt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        read_checkpoint(bad)
    foreign = tmp_path / "foreign.pth"
    torch.save({"layer.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="cannot tell the layout"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("layout", ["detr_fast", "transformers-v4", "original"])
def test_convert_to_every_layout_and_back_keeps_the_outputs(device, tmp_path, layout):
    """A model with auxiliary loss, labels and a backbone the weights cannot name (its blocks match no ResNet),
    converted to `layout` and back to ours: the same config and bit-identical outputs."""
    model = tiny_model(device, backbone="resnet26d", auxiliary_loss=True, id2label={i: f"c{i}" for i in range(7)})
    model.save_pretrained(tmp_path / "ours")
    there = tmp_path / ("original.pth" if layout == "original" else layout)
    assert cli_main(["convert", str(tmp_path / "ours"), str(there), "--layout", layout]) == 0
    assert cli_main(["convert", str(there), str(tmp_path / "back")]) == 0
    back = DetrForObjectDetection.from_pretrained(str(tmp_path / "back")).to(device)
    assert back.config == model.config
    batch = padded_batch(device)
    for a, b in zip(outputs(model, batch), outputs(back, batch), strict=True):
        assert torch.equal(a, b)


def test_an_original_checkpoint_stores_its_args(device, tmp_path):
    model = tiny_model(device, auxiliary_loss=True)
    model.save_pretrained(tmp_path / "ours")
    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "original.pth"), "--layout", "original"]) == 0
    with torch.serialization.safe_globals([argparse.Namespace]):
        stored = torch.load(tmp_path / "original.pth", weights_only=True)
    args = stored["args"]
    assert (args.nheads, args.hidden_dim, args.enc_layers, args.dec_layers, args.aux_loss) == (4, 64, 2, 3, True)
    assert (args.num_queries, args.backbone, args.position_embedding, args.num_classes) == (12, "resnet18", "sine", 7)
    torch.save({"model": stored["model"]}, tmp_path / "bare.pth")  # an original checkpoint without args
    with pytest.warns(UserWarning, match="do not record encoder_attention_heads and decoder_attention_heads"):
        original, config = read_checkpoint(tmp_path / "bare.pth")
    assert original.keys() == model.state_dict().keys() and config.original_detr


def test_a_training_checkpoint_loads_as_weights_with_its_config(device, tmp_path):
    from detr_fast.train.checkpoint import CHECKPOINT_FORMAT

    model = tiny_model(device, id2label={i: f"c{i}" for i in range(7)})
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict(),
                "config": {}, "step": 3}, tmp_path / "checkpoint.pt")  # fmt: skip
    loaded = DetrForObjectDetection.from_pretrained(str(tmp_path / "checkpoint.pt")).to(device)
    assert loaded.config == model.config and loaded.config.id2label[3] == "c3"
    assert cli_main(["convert", str(tmp_path / "checkpoint.pt"), str(tmp_path / "model")]) == 0
    batch = padded_batch(device)
    for a, b in zip(outputs(model, batch), outputs(loaded, batch), strict=True):
        assert torch.equal(a, b)


def test_models_load_in_eval_mode(device, tmp_path):
    """Two identical inference calls give identical outputs right after loading (dropout off), as transformers'."""
    model = tiny_model(device, dropout=0.3)
    model.save_pretrained(tmp_path / "ours")
    loaded = DetrForObjectDetection.from_pretrained(str(tmp_path / "ours")).to(device)
    assert not loaded.training
    batch = padded_batch(device)
    for a, b in zip(outputs(loaded, batch), outputs(loaded, batch), strict=True):
        assert torch.equal(a, b)
