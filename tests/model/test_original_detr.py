"""config.original_detr: facebookresearch/detr's behaviour where transformers differs, and the default."""

import torch

from detr_fast import DetrConfig, DetrForObjectDetection

from ..helpers import padded_batch, relative_error, tiny_config_kwargs


def build(device, **overrides):
    kwargs = tiny_config_kwargs(auxiliary_loss=True, **overrides)
    kwargs.pop("use_timm_backbone")
    model = DetrForObjectDetection(DetrConfig(**kwargs)).to(device)
    # Layer norms start as the identity on already-normed inputs; random affines make "normed or not" visible.
    with torch.no_grad():
        for module in model.model.decoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def decoder_layer_outputs(model, device):
    """Raw output of every decoder layer (before the shared layer norm), captured with hooks (a layer returns its
    output and its attention weights)."""
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0])) for layer in model.model.decoder.layers]
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    for hook in hooks:
        hook.remove()
    return out, captured


def test_original_feeds_raw_outputs_and_norms_each_once(device):
    model = build(device, original_detr=True).eval()
    out, raw = decoder_layer_outputs(model, device)
    norm = model.model.decoder.layernorm
    heads = [(model.class_labels_classifier(norm(h)), model.bbox_predictor(norm(h)).sigmoid()) for h in raw]
    for (logits, boxes), aux in zip(heads[:-1], out.auxiliary_outputs):
        assert relative_error(aux["logits"], logits) < 1e-6 and relative_error(aux["pred_boxes"], boxes) < 1e-6
    assert relative_error(out.logits, heads[-1][0]) < 1e-6


def test_each_original_layer_reads_the_raw_output_of_the_previous(device):
    for original, expect_normed in ((True, False), (False, True)):
        model = build(device, original_detr=original).eval()
        layer_inputs = []
        hook = model.model.decoder.layers[1].register_forward_pre_hook(
            lambda m, args, seen=layer_inputs: seen.append(args[0])
        )
        _, raw = decoder_layer_outputs(model, device)
        hook.remove()
        expected = model.model.decoder.layernorm(raw[0]) if expect_normed else raw[0]
        assert torch.equal(layer_inputs[0], expected)


def test_transformers_default_feeds_normed_outputs_and_norms_the_last_twice(device):
    model = build(device).eval()
    out, raw = decoder_layer_outputs(model, device)
    norm = model.model.decoder.layernorm
    with torch.no_grad():
        last = norm(norm(raw[-1]))
        first_aux = norm(raw[0])
    assert relative_error(out.logits, model.class_labels_classifier(last)) < 1e-6
    assert relative_error(out.auxiliary_outputs[0]["logits"], model.class_labels_classifier(first_aux)) < 1e-6


def test_decoder_input_differs_between_the_two(device):
    """Same weights, eval mode: with auxiliary_loss the two behaviours give different last-layer logits."""
    ours = build(device).eval()
    original = build(device, original_detr=True).eval()
    original.load_state_dict(ours.state_dict())
    pixel_values, pixel_mask = padded_batch(device)
    with torch.no_grad():
        assert relative_error(original(pixel_values, pixel_mask).logits, ours(pixel_values, pixel_mask).logits) > 1e-3


def encoder_input_and_projection(model, device):
    """(what the first encoder layer reads [B, S, C], the flattened input projection [B, S, C]) in one forward."""
    captured = {}

    def keep_input(module, args):
        captured["input"] = args[0]

    def keep_output(module, args, output):
        captured["projection"] = output

    hooks = [
        model.model.encoder.layers[0].register_forward_pre_hook(keep_input),
        model.model.input_projection.register_forward_hook(keep_output),
    ]
    model(*padded_batch(device))
    for hook in hooks:
        hook.remove()
    return captured["input"].detach(), captured["projection"].detach().flatten(2).transpose(1, 2)


def test_encoder_input_dropout_only_in_transformers_mode(device):
    encoder_input, source = encoder_input_and_projection(build(device, original_detr=True, dropout=0.5).train(), device)
    assert torch.equal(encoder_input, source)
    encoder_input, source = encoder_input_and_projection(build(device, dropout=0.5).train(), device)
    dropped = (encoder_input == 0) & (source != 0)
    assert 0.4 < dropped.float().mean().item() < 0.6
