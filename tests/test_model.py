"""Behaviour of the model beyond the official fixtures: masking, loss options, edge cases, I/O, errors."""

from __future__ import annotations

import json

import pytest
import torch

from m3ae import M3AE, ConfigError, M3AEConfig
from m3ae.model.losses import masked_cross_entropy, normalize_patches
from m3ae.model.layers import gelu
from m3ae.model.masking import random_masking

SMALL = dict(image_size=32, patch_size=8, text_length=12, vocab_size=50, emb_dim=32, depth=2, num_heads=4,
             dec_emb_dim=24, dec_depth=1, dec_num_heads=2)


def make(**overrides) -> M3AE:
    torch.manual_seed(0)
    return M3AE(M3AEConfig(**{**SMALL, **overrides}))


def batch(B=4, lengths=(12, 7, 3, 0), seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, 32, 32, generator=g)
    text = torch.randint(1, 50, (B, 12), generator=g)
    pad = torch.arange(12)[None, :] >= torch.tensor(lengths[:B])[:, None]
    return image, text.masked_fill(pad, 0), pad


# ------------------------------------------------------------------ masking
@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("masking", ["per_sample", "shared"])
def test_real_token_masking_keeps_int_n_real_times_one_minus_r_real_tokens_per_caption(ratio, masking):
    model = make(text_mask_over="real", text_mask_ratio=ratio, masking=masking)
    lengths = list(range(13))  # every caption length 0..12 of text_length 12
    image, text, pad = batch(13, lengths)
    torch.manual_seed(2)
    out = model(image, text, pad)
    kept = out.text_ids_keep  # what the encoder saw, padding included
    real_kept = (~pad).gather(1, kept).sum(1)
    assert real_kept.tolist() == [int(n * (1 - ratio)) for n in lengths]
    assert kept.shape[1] == int(12 * (1 - ratio))  # the longest caption sets the block; the rest is padding
    # the loss is on the removed real tokens: every real token is either seen or scored
    assert torch.equal(((1 - out.text_mask) * (~pad)).sum(1).long(), real_kept)
    # the official behaviour stays the default: int(L (1 - r)) positions over the padded caption
    torch.manual_seed(2)
    official = make(text_mask_ratio=ratio, masking=masking)(image, text, pad)
    assert official.text_ids_keep.shape[1] == int(12 * (1 - ratio))
    assert (~pad).gather(1, official.text_ids_keep).sum(1).tolist() != [int(n * (1 - ratio)) for n in lengths]


def test_per_sample_masking_keeps_exact_counts_and_covers_positions_uniformly():
    torch.manual_seed(0)
    B, L, keep, draws = 64, 16, 4, 200
    removed = torch.zeros(L)
    for _ in range(draws):
        m = random_masking(torch.rand(B, L), B, L, keep)
        assert (m.mask.sum(1) == L - keep).all()
        assert torch.equal(torch.sort(torch.cat([m.ids_keep, m.ids_removed], 1), 1).values, torch.arange(L).expand(B, L))
        assert torch.equal(m.mask.gather(1, m.ids_keep), torch.zeros(B, keep))
        removed += m.mask.sum(0)
    frequency = removed / (B * draws)
    assert torch.allclose(frequency, torch.full((L,), (L - keep) / L), atol=0.02), frequency


def test_per_sample_noise_differs_between_samples_and_shared_noise_does_not():
    image, text, pad = batch()
    per_sample = make()(image, text, pad)
    assert len({tuple(row.tolist()) for row in per_sample.image_mask}) > 1
    shared = make(masking="shared")(image, text, pad)
    assert (shared.image_mask == shared.image_mask[0]).all() and (shared.text_mask == shared.text_mask[0]).all()


def test_noise_vector_broadcasts_like_a_repeated_batch_noise():
    model, (image, text, pad) = make(), batch()
    noise_i, noise_t = torch.rand(16), torch.rand(12)
    a = model(image, text, pad, image_noise=noise_i, text_noise=noise_t)
    b = model(image, text, pad, image_noise=noise_i.expand(4, 16), text_noise=noise_t.expand(4, 12))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.image_mask, b.image_mask)
    with pytest.raises(ValueError, match=r"noise must have shape \(16,\) or \(4, 16\)"):
        model(image, image_noise=torch.rand(3, 16))


def test_removed_patches_do_not_influence_the_encoder():
    model, (image, _, _) = make(), batch()
    noise = torch.rand(4, 16)
    out = model(image, image_noise=noise)
    changed = model.unpatchify(model.patchify(image) + 5.0 * out.image_mask[..., None])  # alter removed patches only
    torch.testing.assert_close(model(changed, image_noise=noise).latent, out.latent)


def test_padded_token_ids_do_not_change_real_positions():
    model, (image, text, pad) = make(), batch()
    other = text.masked_fill(pad, 7)
    a = model.encode(image, text, pad).last_hidden_state
    b = model.encode(image, other, pad).last_hidden_state
    real = torch.cat([torch.ones(4, 1 + 16, dtype=torch.bool), ~pad], 1)
    torch.testing.assert_close(a[real], b[real])


# ------------------------------------------------------------------ losses
def test_norm_pix_loss_targets_per_patch_normalised_pixels():
    image, text, pad = batch()
    model = make(norm_pix_loss=True)
    noise = torch.rand(4, 16)
    out = model(image, image_noise=noise)
    target = model.patchify(image)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    per_patch = ((out.image_pred - target) ** 2).mean(-1)
    expected = ((per_patch * out.image_mask).sum(1) / out.image_mask.sum(1)).mean()
    torch.testing.assert_close(out.image_loss, expected)
    assert torch.allclose(normalize_patches(target).mean(-1), torch.zeros(4, 16), atol=1e-5)
    plain = make()(image, image_noise=noise)
    assert not torch.allclose(plain.image_loss, out.image_loss)


def test_loss_on_all_tokens():
    image, text, pad = batch()
    model = make(image_loss_on_all=True, text_loss_on_all=True)
    out = model(image, text, pad)
    expected_image = ((out.image_pred - model.patchify(image)) ** 2).mean()
    torch.testing.assert_close(out.image_loss, expected_image)
    nll = torch.nn.functional.cross_entropy(out.text_logits.transpose(1, 2), text, reduction="none")
    real = (~pad).float()
    expected_text = ((nll * real).sum(1) / real.sum(1).clamp_min(1e-5)).mean()
    torch.testing.assert_close(out.text_loss, expected_text)
    torch.testing.assert_close(out.loss, expected_image + 0.5 * expected_text)


def test_fully_padded_captions_give_zero_text_loss_and_finite_gradients():
    image, text, _ = batch()
    pad = torch.ones(4, 12, dtype=torch.bool)
    model = make()
    out = model(image, torch.zeros_like(text), pad)
    assert out.text_loss.item() == 0.0 and out.text_accuracy.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.loss, out.image_loss)


def test_a_padded_row_counts_in_the_batch_mean_with_zero():
    model, (image, text, pad) = make(masking="shared"), batch()
    noise_i, noise_t = torch.rand(16), torch.rand(12)
    full = model(image, text, pad, image_noise=noise_i, text_noise=noise_t)
    three = model(image[:3], text[:3], pad[:3], image_noise=noise_i, text_noise=noise_t)  # row 3 is all padding
    torch.testing.assert_close(full.text_loss, three.text_loss * 3 / 4)


def test_removed_positions_head_gives_the_same_loss_as_the_full_head():
    model, (image, text, pad) = make(), batch()
    noise_i, noise_t = torch.rand(4, 16), torch.rand(4, 12)
    full = model(image, text, pad, image_noise=noise_i, text_noise=noise_t)
    lean = model(image, text, pad, image_noise=noise_i, text_noise=noise_t, compute_logits=False)
    assert lean.text_logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.text_accuracy, full.text_accuracy)
    # both placements of the head: every removed position (accelerators) and removed real words (CPU)
    decoded = torch.randn(4, 12, model.config.dec_emb_dim)
    masking = random_masking(noise_t, 4, 12, model.config.text_keep())
    logits = model.decoder_text_output(decoded)
    expected = masked_cross_entropy(logits, text, masking.mask * (~pad).float())
    for sync_free in (True, False):
        got = model._text_loss_where_read(decoded, text, pad, masking, sync_free)
        torch.testing.assert_close(got, expected)


def test_batch_of_one():
    image, text, pad = batch(B=1, lengths=(5,))
    out = make()(image, text, pad)
    assert out.image_pred.shape == (1, 16, 192) and out.text_logits.shape == (1, 12, 50)
    out.loss.backward()


def test_bf16_autocast_forward_and_backward_on_cpu():
    model, (image, text, pad) = make(), batch()
    noise_i, noise_t = torch.rand(4, 16), torch.rand(4, 12)
    reference = model(image, text, pad, image_noise=noise_i, text_noise=noise_t).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, text, pad, image_noise=noise_i, text_noise=noise_t)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gelu_is_the_tanh_form_in_fp32_and_within_bf16_rounding_of_it_in_bf16():
    # every finite bfloat16 value in [-20, 20], against the tanh form in float64
    x = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[x.float().isfinite() & (x.float().abs() <= 20)]
    x64 = x.double().requires_grad_()
    exact = torch.nn.functional.gelu(x64, approximate="tanh")
    (exact_grad,) = torch.autograd.grad(exact.sum(), x64)
    assert torch.equal(gelu(x.float()), torch.nn.functional.gelu(x.float(), approximate="tanh"))

    xb = x.clone().requires_grad_()
    y = gelu(xb)
    (grad,) = torch.autograd.grad(y.float().sum(), xb)
    rounding = exact.abs() * 2.0**-8  # at least half of bfloat16's spacing at the exact value
    assert ((y.double() - exact).abs() <= rounding + 4.8e-4).all()
    assert ((grad.double() - exact_grad).abs() <= exact_grad.abs() * 2.0**-8 + 8.8e-4).all()
    aten_tanh_bf16 = torch.nn.functional.gelu(x, approximate="tanh")
    assert (y == aten_tanh_bf16).double().mean() > 0.97

def test_text_length_other_than_the_configured_one_is_accepted():
    model = make()
    text = torch.randint(1, 50, (2, 40))
    out = model(text=text)
    assert out.text_logits.shape == (2, 40, 50) and out.text_mask.sum(1).eq(40 - int(40 * 0.25)).all()


def test_drop_path_only_acts_in_training():
    model, (image, _, _) = make(drop_path=0.5), batch()
    model.eval()
    torch.testing.assert_close(model.encode(image).cls, model.encode(image).cls)
    model.train()
    torch.manual_seed(1)
    a = model.encode(image).cls
    torch.manual_seed(2)
    assert not torch.allclose(a, model.encode(image).cls)


# ------------------------------------------------------------------ representations and attention
def test_encode_attention_rows_sum_to_one_and_ignore_padding_keys():
    model, (image, text, pad) = make(), batch()
    enc = model.encode(image, text, pad, output_attentions=True, output_hidden_states=True)
    assert len(enc.attentions) == 2 and len(enc.hidden_states) == 2
    for attention in enc.attentions:
        assert attention.shape == (4, 4, 1 + 16 + 12, 1 + 16 + 12)
        torch.testing.assert_close(attention.sum(-1), torch.ones(4, 4, 29))
        key_pad = torch.cat([torch.zeros(4, 17, dtype=torch.bool), pad], 1)
        assert attention.masked_select(key_pad[:, None, None, :].expand_as(attention)).abs().max() == 0
    torch.testing.assert_close(model.encoder.norm(enc.hidden_states[-1]), enc.last_hidden_state)
    text_only = model.encode(text=text, text_padding_mask=pad)
    assert text_only.image_tokens is None and text_only.text_tokens.shape == (4, 12, 32)


def test_padding_mask_as_float_or_bool_is_the_same():
    model, (image, text, pad) = make(), batch()
    noise_i, noise_t = torch.rand(16), torch.rand(12)
    a = model(image, text, pad, image_noise=noise_i, text_noise=noise_t)
    b = model(image, text, pad.float(), image_noise=noise_i, text_noise=noise_t)
    torch.testing.assert_close(a.loss, b.loss)


# ------------------------------------------------------------------ persistence
def test_save_and_load_round_trip(tmp_path):
    model, (image, text, pad) = make(output_head_depth=2), batch()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["output_head_depth"] == 2
    loaded = M3AE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    noise_i, noise_t = torch.rand(16), torch.rand(12)
    torch.testing.assert_close(
        loaded(image, text, pad, image_noise=noise_i, text_noise=noise_t).loss,
        model(image, text, pad, image_noise=noise_i, text_noise=noise_t).loss, atol=0, rtol=0,
    )
    bigger = M3AE.from_pretrained(tmp_path / "m", image_size=48)  # sin-cos tables are recomputed
    assert bigger.encode(torch.randn(1, 3, 48, 48)).image_tokens.shape == (1, 36, 32)


def test_from_pretrained_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M3AE.from_pretrained(tmp_path)
    make().save_pretrained(tmp_path / "a")
    M3AE(M3AEConfig(**{**SMALL, "depth": 3})).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        M3AE.from_pretrained(tmp_path / "b")


# ------------------------------------------------------------------ configuration and input errors
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=30), "image_size"),
        (dict(image_mask_ratio=1.0), "image_mask_ratio"),
        (dict(text_mask_ratio=-0.1), "text_mask_ratio"),
        (dict(num_heads=5), "num_heads"),
        (dict(dec_num_heads=5), "dec_num_heads"),
        (dict(model_type="clip"), "model_type"),
        (dict(masking="global"), "masking"),
        (dict(depth=0), "depth"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"M3AEConfig\.{field}="):
        M3AEConfig(**{**SMALL, **overrides})


def test_presets_have_the_paper_sizes():
    for name, (width, depth, heads) in {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}.items():
        c = M3AEConfig.from_preset(name)
        assert (c.emb_dim, c.depth, c.num_heads, c.dec_emb_dim, c.dec_depth, c.dec_num_heads) == (width, depth, heads, 512, 8, 16)
    with pytest.raises(ConfigError, match="preset='gigantic'"):
        M3AEConfig.from_preset("gigantic")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, i, t, p: m(i[:, :, :16]), r"image must have shape \(B, 3, 32, 32\)"),
        (lambda m, i, t, p: m(i.long()), "image must be a float tensor"),
        (lambda m, i, t, p: m(i, t.float(), p), "text must hold integer token ids"),
        (lambda m, i, t, p: m(i, t[0], p), r"text must have shape \(B, L\)"),
        (lambda m, i, t, p: m(i, t, p[:, :5]), "text_padding_mask must have the shape of text"),
        (lambda m, i, t, p: m(i[:2], t, p), "image batch 2 and text batch 4 differ"),
        (lambda m, i, t, p: m(), "needs `image`, `text` or both"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(make(), *batch())


def test_mae_model_refuses_text():
    with pytest.raises(ValueError, match="image-only"):
        make(model_type="mae")(*batch())


@pytest.mark.parametrize("padded", [True, False])
def test_written_out_attention_matches_the_fused_kernel_and_is_the_cpu_default(padded):
    from m3ae.model.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 10, 32)
    pad = (torch.arange(10)[None, :] >= torch.tensor([10, 6, 1])[:, None]) if padded else None

    def run(impl, bf16=False):
        attn.impl = impl
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = attn(xi, pad)
        out.float().square().sum().backward()
        return [out.detach().float(), xi.grad] + [p.grad for p in attn.parameters()]

    math, sdpa = run("math"), run("sdpa")
    for a, b in zip(math, sdpa):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # padding keys get no attention; every row sums to one
    probs = attn.eval()._probabilities(*attn.qkv(x).view(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)[:2], pad)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 10))
    if padded:
        assert probs.masked_select(pad[:, None, None, :].expand_as(probs)).abs().max() == 0
    # auto on CPU: the written-out softmax in fp32 and under bf16 autocast (bench/step_ab.py --switch attention)
    for a, b in zip(run("auto"), math):
        assert torch.equal(a, b)
    for a, b in zip(run("auto", bf16=True), run("math", bf16=True)):
        assert torch.equal(a, b)


def test_cpu_decoder_skips_the_batch_trailing_padding_with_the_same_loss_and_gradients():
    m = make()
    image, text, pad = batch(lengths=(5, 7, 3, 0))  # the longest caption: 7 of 12 tokens
    seen = []
    hook = m.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))

    def run(**kw):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = m(image, text, pad, **kw)
        out.loss.backward()
        return [out.loss, out.image_loss, out.text_loss, out.text_accuracy] + [p.grad for p in m.parameters()]

    full = run(compute_logits=True)  # logits at every position: the decoder runs all 1 + 16 + 12
    trimmed = run(compute_logits=False)
    m.trim_decoder_padding = False
    untrimmed = run(compute_logits=False)
    hook.remove()
    assert seen == [1 + 16 + 12, 1 + 16 + 7, 1 + 16 + 12]
    for a, b, c in zip(full, trimmed, untrimmed):
        if a is None:
            assert b is None and c is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
