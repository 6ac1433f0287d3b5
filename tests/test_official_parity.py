"""Our model against golden outputs of the official JAX code (tests/fixtures/official_m3ae)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close


def paired_forward(fx, prefix="paired", **kwargs):
    return fx.model(
        fx.image,
        fx["input/text"].long(),
        fx["input/text_padding_mask"],
        image_noise=fx[f"{prefix}/image_noise"],
        text_noise=fx[f"{prefix}/text_noise"],
        **kwargs,
    )


def test_patchify_layout_matches_official(m3ae_tiny):
    patches = m3ae_tiny.model.patchify(m3ae_tiny.image)
    assert torch.equal(patches, m3ae_tiny["input/image_patches"])
    assert torch.equal(m3ae_tiny.model.unpatchify(patches), m3ae_tiny.image)


@pytest.mark.parametrize("fixture_name", ["m3ae_tiny", "m3ae_tiny_head1"])
def test_paired_forward(fixture_name, request):
    fx = request.getfixturevalue(fixture_name)
    with torch.no_grad():
        out = paired_forward(fx)
    c = fx.config
    assert torch.equal(out.image_ids_keep[0], fx["paired/image_ids_shuffle"][: c.image_keep].long())
    assert torch.equal(out.text_ids_keep[0], fx["paired/text_ids_shuffle"][: c.text_keep()].long())
    assert torch.equal(out.image_mask, fx["paired/image_mask"])
    assert torch.equal(out.text_mask, fx["paired/text_mask"])
    assert_close(out.latent[:, :1], fx["paired/enc_cls_x"], "encoder CLS")
    assert_close(out.latent[:, 1 : 1 + c.image_keep], fx["paired/enc_image_x"], "encoder image tokens")
    assert_close(out.latent[:, 1 + c.image_keep :], fx["paired/enc_text_x"], "encoder text tokens")
    assert_close(out.image_pred, fx["paired/image_output"], "image head")
    assert_close(out.text_logits, fx["paired/text_output"], "text head")
    for name in ("loss", "image_loss", "text_loss", "text_accuracy"):
        assert_close(getattr(out, name), fx[f"paired/{name}"], name)


def test_paired_intermediates_and_attention(m3ae_tiny):
    fx, model, captured = m3ae_tiny, m3ae_tiny.model, {}
    watched = {
        "image_embedding": model.image_embedding,
        "text_embedding": model.text_embedding,
        "decoder_input_projection": model.decoder_input_projection,
        "encoder": model.encoder,
        "decoder": model.decoder,
        **{f"encoder/Block_{i}": b for i, b in enumerate(model.encoder.blocks)},
        **{f"decoder/Block_{i}": b for i, b in enumerate(model.decoder.blocks)},
    }
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, out))
        for name, module in watched.items()
    ]
    try:
        with torch.no_grad():
            out = paired_forward(fx, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    inter = "paired/inter/"
    assert_close(captured["image_embedding"], fx[inter + "image_embedding/__call__/0"], "patch embedding")
    assert_close(captured["text_embedding"], fx[inter + "text_embedding/__call__/0"], "word embedding")
    for stack in ("encoder", "decoder"):
        assert_close(captured[stack][0], fx[f"{inter}{stack}/__call__/0"], f"{stack} output")
        for i in range(2):
            assert_close(captured[f"{stack}/Block_{i}"][0], fx[f"{inter}{stack}/Block_{i}/__call__/0"], f"{stack} block {i}")
    # the official code projects CLS, image and text separately; ours projects them in one call
    projected = captured["decoder_input_projection"]
    keep = fx.config.image_keep
    for i, part in enumerate((projected[:, :1], projected[:, 1 : 1 + keep], projected[:, 1 + keep :])):
        assert_close(part, fx[f"{inter}decoder_input_projection/__call__/{i}"], f"decoder projection {i}")
    for i in range(2):
        assert_close(out.encoder_attentions[i], fx[f"{inter}encoder/Block_{i}/Attention_0/attention/0"], f"encoder attention {i}")
    assert_close(out.decoder_attentions[0], fx[inter + "decoder/Block_0/Attention_0/attention/0"], "decoder attention 0")


def _assert_grads(model, expected, what):
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        assert_close(grad, expected[name], f"{what} gradient of {name}")
    assert set(expected) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("fixture_name", ["m3ae_tiny", "m3ae_tiny_head1"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "math", "auto"])
def test_paired_gradients(fixture_name, attn_impl, request):
    fx = request.getfixturevalue(fixture_name)
    for block in list(fx.model.encoder.blocks) + list(fx.model.decoder.blocks):
        block.attn.impl = attn_impl
    fx.model.zero_grad(set_to_none=True)
    try:
        paired_forward(fx).loss.backward()  # 1.0 · image + 0.5 · text, as the fixture
        _assert_grads(fx.model, fx.grads("paired"), "paired")
    finally:
        for block in list(fx.model.encoder.blocks) + list(fx.model.decoder.blocks):
            block.attn.impl = fx.config.attn_impl
        fx.model.zero_grad(set_to_none=True)


def test_paired_loss_with_head_only_at_removed_positions(m3ae_tiny):
    fx = m3ae_tiny
    out = paired_forward(fx, compute_logits=False)
    assert out.text_logits is None
    for name in ("loss", "text_loss", "text_accuracy"):
        assert_close(getattr(out, name), fx[f"paired/{name}"], name)
    fx.model.zero_grad(set_to_none=True)
    out.loss.backward()
    _assert_grads(fx.model, fx.grads("paired"), "paired (removed-positions head)")
    fx.model.zero_grad(set_to_none=True)


def test_text_only_forward_and_gradients(m3ae_tiny):
    fx = m3ae_tiny
    out = fx.model(
        text=fx["textonly/input/text"].long(),
        text_padding_mask=fx["textonly/input/text_padding_mask"],
        text_noise=fx["textonly/text_noise"],
    )
    assert out.image_loss is None and out.image_pred is None
    assert torch.equal(out.text_mask, fx["textonly/text_mask"])
    assert_close(out.latent[:, :1], fx["textonly/enc_cls_x"], "text-only CLS")
    assert_close(out.latent[:, 1:], fx["textonly/enc_text_x"], "text-only tokens")
    assert_close(out.text_logits, fx["textonly/text_output"], "text-only head")
    assert_close(out.text_loss, fx["textonly/text_loss"], "text-only loss")
    assert_close(out.text_accuracy, fx["textonly/text_accuracy"], "text-only accuracy")
    fx.model.zero_grad(set_to_none=True)
    out.text_loss.backward()  # the unpaired-text branch is unweighted in the official trainer
    _assert_grads(fx.model, fx.grads("textonly"), "text-only")
    fx.model.zero_grad(set_to_none=True)


def test_image_only_forward(m3ae_tiny):
    fx = m3ae_tiny
    with torch.no_grad():
        out = fx.model(fx.image, image_noise=fx["imageonly/image_noise"])
    assert out.text_loss is None and out.text_logits is None
    assert torch.equal(out.image_mask, fx["imageonly/image_mask"])
    assert_close(out.image_pred, fx["imageonly/image_output"], "image-only head")
    assert_close(out.image_loss, fx["imageonly/image_loss"], "image-only loss")
    assert_close(out.loss, fx["imageonly/image_loss"], "image-only total loss")


@pytest.mark.parametrize("fixture_name", ["m3ae_tiny", "m3ae_tiny_head1"])
def test_unmasked_representations(fixture_name, request):
    fx = request.getfixturevalue(fixture_name)
    with torch.no_grad():
        both = fx.model.encode(fx.image, fx["input/text"].long(), fx["input/text_padding_mask"])
        image_only = fx.model.encode(fx.image)
    assert_close(both.last_hidden_state, fx["repr/image_text"], "image+text representation")
    assert_close(image_only.last_hidden_state, fx["repr/image_only"], "image-only representation")
    assert torch.equal(image_only.cls, image_only.last_hidden_state[:, 0])
    assert both.text_tokens.shape == (3, fx.config.text_length, fx.config.emb_dim)


def test_mae_forward_gradients_and_representation(mae_tiny):
    fx = mae_tiny
    assert fx.config.model_type == "mae" and not hasattr(fx.model, "text_embedding")
    fx.model.zero_grad(set_to_none=True)
    out = fx.model(fx.image, image_noise=fx["mae/image_noise"])
    assert torch.equal(out.image_mask, fx["mae/image_mask"])
    assert_close(out.latent, fx["mae/enc_x"], "MAE encoder")
    assert_close(out.image_pred, fx["mae/image_output"], "MAE head")
    assert_close(out.loss, fx["mae/loss"], "MAE loss")
    out.loss.backward()
    _assert_grads(fx.model, fx.grads("mae"), "MAE")
    fx.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert_close(fx.model.encode(fx.image).last_hidden_state, fx["repr/image"], "MAE representation")
