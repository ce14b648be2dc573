"""The style-adapter model on tiny real FLUX.1-Fill / SigLIP components (docs/ARCHITECTURE.md §3)."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from train.models.adapter import QFormerProjection, StyleAdapter
from train.models.calligrapher import Calligrapher, prompt_for


def _batch(model: Calligrapher, texts=("hi", "there"), size=64, guidance=3.5):
    g = torch.Generator().manual_seed(1)
    b = len(texts)
    source = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 16:48, 8:56] = 1
    styles = [Image.new("RGB", (size, size), (40 * i, 120, 200 - 40 * i)) for i in range(b)]
    embeds, pooled, ids = model.encode_prompt(list(texts), max_sequence_length=32)
    cond = model.prepare_condition(source, mask, embeds, pooled, ids, model.encode_style(styles), guidance)
    latents = torch.randn(b, cond.cond_latents.shape[1], 64, generator=g)
    return cond, latents


def _base_velocity(tiny_models, cond, latents, sigma=0.6):
    """The unmodified diffusers transformer (its own processors), loaded separately from disk."""
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(tiny_models["flux"], subfolder="transformer")
    with torch.no_grad():
        return base(
            hidden_states=torch.cat([latents, cond.cond_latents], -1), timestep=torch.full((latents.shape[0],), sigma),
            guidance=cond.guidance, pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds, txt_ids=cond.text_ids, img_ids=cond.img_ids, return_dict=False,
        )[0]


def test_prompt_template():
    assert prompt_for("Hello") == "The text is 'Hello'."


def test_scale_zero_is_exactly_the_base_model(tiny_models, calligrapher):
    cond, latents = _batch(calligrapher)
    base = _base_velocity(tiny_models, cond, latents)
    calligrapher.adapter.set_scale(0.0)
    with torch.no_grad():
        v0 = calligrapher.velocity(latents, 0.6, cond)
    assert torch.equal(v0, base)
    calligrapher.adapter.set_scale(1.0)
    with torch.no_grad():
        v1 = calligrapher.velocity(latents, 0.6, cond)
    assert (v1 - base).abs().max() > 1e-3


def test_style_reaches_single_stream_blocks(calligrapher):
    """Only the last (single-stream) block's style values are non-zero: the output must still move."""
    cond, latents = _batch(calligrapher)
    calligrapher.adapter.set_scale(1.0)
    blocks = calligrapher.adapter.ip_adapter
    names = list(calligrapher.transformer.attn_processors)
    assert names[-1].startswith("single_transformer_blocks") and names[0].startswith("transformer_blocks")
    with torch.no_grad():
        for blk in blocks:
            blk.to_v_ip.weight.zero_()
        no_style = calligrapher.velocity(latents, 0.6, cond)
        blocks[-1].to_v_ip.weight.normal_()
        single_only = calligrapher.velocity(latents, 0.6, cond)
    assert (single_only - no_style).abs().max() > 1e-4


@pytest.mark.slow
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(calligrapher):
    cond, latents = _batch(calligrapher)
    calligrapher.velocity(latents, 0.6, cond).square().mean().backward()
    adapter_params = dict(calligrapher.adapter.named_parameters())
    assert adapter_params, "adapter has no parameters"
    for name, p in adapter_params.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = [calligrapher.transformer, calligrapher.vae, calligrapher.pipe.text_encoder,
              calligrapher.pipe.text_encoder_2, calligrapher.siglip]
    for module in frozen:
        for name, p in module.named_parameters():
            assert not p.requires_grad and p.grad is None, name
    # The transformer does not own the adapter's weights (disjoint parameter trees).
    ids = {id(p) for p in calligrapher.transformer.parameters()}
    assert not ids & {id(p) for p in adapter_params.values()}


def test_parameter_report_counts(calligrapher):
    rep = calligrapher.parameter_report()
    n = sum(p.numel() for p in calligrapher.adapter.parameters())
    assert rep["trainable"] == n == rep["image_proj.mlp"] + rep["image_proj.qformer"] + rep["ip_adapter"]
    assert rep["style_blocks"] == 2  # one double + one single block in the tiny transformer


def test_functional_call_with_other_weights(calligrapher):
    """``params=`` evaluates another adapter on the same base model; same weights -> same bits."""
    cond, latents = _batch(calligrapher)
    with torch.no_grad():
        live = calligrapher.velocity(latents, 0.3, cond)
    same = {k: v.clone() for k, v in calligrapher.adapter.state_dict().items()}
    assert torch.equal(calligrapher.velocity(latents, 0.3, cond, params=same), live)

    other = copy.deepcopy(calligrapher.adapter)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    swapped = calligrapher.velocity(latents, 0.3, cond, params=dict(other.state_dict()))
    assert not swapped.requires_grad
    # Reference: install the perturbed adapter for real.
    other.install(calligrapher.transformer)
    with torch.no_grad():
        direct = calligrapher.velocity(latents, 0.3, cond, adapter=other)
    assert torch.equal(swapped, direct)
    assert (swapped - live).abs().max() > 1e-4


def test_qformer_matches_torch_multihead_attention():
    torch.manual_seed(0)
    q = QFormerProjection(style_dim=24, token_dim=32, num_tokens=6)
    style = torch.randn(3, 24)
    with torch.no_grad():
        kv = q.id_proj(style).view(3, -1, 32)
        queries = q.query_embeds.unsqueeze(0).expand(3, -1, -1)
        ref = q.norm(q.cross_attn_norm(q.cross_attn(queries, kv, kv, need_weights=False)[0] + queries))
        assert torch.allclose(q(style), ref, atol=1e-6)


def test_style_tokens_shape(calligrapher):
    tokens = calligrapher.adapter.image_proj(torch.randn(3, calligrapher.siglip.config.hidden_size))
    assert tokens.shape == (3, 8, calligrapher.transformer.config.joint_attention_dim)


@pytest.mark.slow
def test_sampler_matches_flux_fill_pipeline(calligrapher):
    """Conditioning + Euler sampling with the adapter = FluxFillPipeline on the same image, mask and noise."""
    import numpy as np
    from diffusers import FluxFillPipeline

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask_img = Image.new("L", (64, 64), 0)
    mask_img.paste(255, (8, 16, 56, 48))
    source = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = (torch.from_numpy(np.array(mask_img))[None, None].float() / 255 > 0.5).float()
    embeds, pooled, ids = calligrapher.encode_prompt(["ab"], max_sequence_length=32)
    style = calligrapher.encode_style([img])
    cond = calligrapher.prepare_condition(source, mask, embeds, pooled, ids, style, 3.5,
                                          generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, cond.cond_latents.shape[1], 64, generator=torch.Generator().manual_seed(3))
    ours = calligrapher.sample(cond, num_steps=3, latents=noise)

    p = calligrapher.pipe
    pipe = FluxFillPipeline(**{k: getattr(p, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                          "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        tokens = calligrapher.adapter.image_proj(style)
    theirs = pipe(
        image=img, mask_image=mask_img, height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
        prompt="The text is 'ab'.", max_sequence_length=32, latents=noise.clone(), output_type="latent",
        generator=torch.Generator().manual_seed(5), joint_attention_kwargs={"image_emb": tokens},
    ).images
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_generation_end_to_end_returns_requested_size(calligrapher):
    cond, _ = _batch(calligrapher, texts=("ok",), size=64)
    latents = calligrapher.sample(cond, num_steps=2, generator=torch.Generator().manual_seed(0))
    pixels = calligrapher.decode_latents(latents, cond.latent_size)
    assert pixels.shape == (1, 3, 64, 64) and torch.isfinite(pixels).all()


def test_pack_unpack_round_trip():
    z = torch.randn(2, 16, 8, 12)
    packed = Calligrapher.pack(z)
    assert packed.shape == (2, 4 * 6, 64)
    assert torch.equal(Calligrapher.unpack(packed, (8, 12)), z)


def test_condition_channels_match_flux_fill_layout(calligrapher):
    cond, latents = _batch(calligrapher)
    # 64 latent + 64 masked-image + 256 folded-mask channels = the transformer's in_channels.
    assert latents.shape[-1] + cond.cond_latents.shape[-1] == calligrapher.transformer.config.in_channels == 384
    # The folded mask is all ones over the masked area's latent patches: rows 16:48 x cols 8:56 of 64x64.
    mask_part = cond.cond_latents[0, :, 64:]  # [16 patches, 256]
    per_patch = mask_part.mean(-1).view(4, 4)
    expected = torch.zeros(64, 64)
    expected[16:48, 8:56] = 1
    assert torch.allclose(per_patch, expected.view(4, 16, 4, 16).mean((1, 3)))


def test_adapter_block_count_mismatch_is_an_error(calligrapher):
    wrong = StyleAdapter(32, 32, [(32, 16)] * 3, num_tokens=8)
    with pytest.raises(ValueError, match="3 style blocks, transformer has 2"):
        wrong.install(calligrapher.transformer)


@pytest.mark.slow
def test_full_size_conditioned_forward_on_meta():
    """FLUX.1-Fill-dev + so400m dimensions (19 + 38 blocks, 24 heads x 128): the style path's shapes line up."""
    from train.models.tiny import build_flux_transformer, build_siglip

    with torch.device("meta"):
        transformer = build_flux_transformer("full", device="meta")
        siglip = build_siglip("full", device="meta")
        adapter = StyleAdapter.for_transformer(transformer, siglip.config.hidden_size, num_tokens=128)
        adapter.install(transformer)
        b, tokens, text = 2, 48 * 32, 512  # a 512x512 source under a 256 px strip: (768/16) x (512/16) tokens
        out = adapter(
            transformer, torch.randn(b, 1152), hidden_states=torch.randn(b, tokens, 384), timestep=torch.ones(b),
            guidance=torch.ones(b), pooled_projections=torch.randn(b, 768),
            encoder_hidden_states=torch.randn(b, text, 4096), txt_ids=torch.zeros(text, 3),
            img_ids=torch.zeros(tokens, 3),
        )
    assert len(adapter.ip_adapter) == 57
    assert out.shape == (b, tokens, 64)


# ---------------------------------------------------------------------- golden style attention (float64)
def _rms(x, weight=None, eps=1e-5):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def _rope(x, cos, sin):
    """Rotate each (even, odd) pair of the head dimension by the angle whose cos/sin are given per position."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


def _sdpa(q, k, v):
    """[B, S, H, D] x [B, N, H, D] -> [B, S, H*D], softmax(q k^T / sqrt(D)) v."""
    w = torch.einsum("bshd,bnhd->bhsn", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhsn,bnhd->bshd", w.softmax(-1), v).flatten(2)


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim))


def _golden_inputs(attn, text_len, image_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = attn.to_q.in_features
    theta = torch.rand(text_len + image_len, attn.head_dim // 2, generator=g, dtype=torch.float64) * 6.0
    cos, sin = theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)
    # Small style tokens: their keys' mean square is ~1e-6, so the RMSNorm eps (1e-5) visibly matters.
    emb = torch.randn(2, 8, 32, generator=g, dtype=torch.float64) * 0.003
    return g, dim, (cos, sin), emb


def _style_block(module, scale):
    """A float64 copy of a style block with values large enough to dominate the comparison."""
    block = copy.deepcopy(module).double()
    with torch.no_grad():
        block.to_v_ip.weight.mul_(300.0)  # the small tokens above would otherwise give ~1e-3 values
    block.scale = scale
    return block


def _style_reference(q_pre_rope, emb, block, scale):
    """The released adapter's style branch: RMS-normalised (no affine, eps 1e-5) keys, raw values."""
    k_ip = _rms(_heads(emb @ block.to_k_ip.weight.T, block.head_dim), eps=1e-5)
    v_ip = _heads(emb @ block.to_v_ip.weight.T, block.head_dim)
    return scale * _sdpa(q_pre_rope, k_ip, v_ip)


def test_double_block_style_attention_golden(calligrapher):
    """One double-stream block computed by hand in float64 from its weights: queries after norm_q and
    before RoPE attend to the style tokens; output x scale is added to the image tokens before to_out."""
    names = list(calligrapher.transformer.attn_processors)
    assert names[0] == "transformer_blocks.0.attn.processor"
    attn = copy.deepcopy(calligrapher.transformer.transformer_blocks[0].attn).double()
    block = _style_block(calligrapher.adapter.ip_adapter[0], 0.7)
    g, dim, rope, emb = _golden_inputs(attn, text_len=4, image_len=6)
    x = torch.randn(2, 6, dim, generator=g, dtype=torch.float64)
    enc = torch.randn(2, 4, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        img_out, enc_out = block.attend(attn, x, enc, None, rope, emb)
        hd = attn.head_dim
        lin = lambda m, t: t @ m.weight.T + (m.bias if m.bias is not None else 0)  # noqa: E731
        q = _rms(_heads(lin(attn.to_q, x), hd), attn.norm_q.weight, attn.norm_q.eps)
        k = _rms(_heads(lin(attn.to_k, x), hd), attn.norm_k.weight, attn.norm_k.eps)
        v = _heads(lin(attn.to_v, x), hd)
        eq = _rms(_heads(lin(attn.add_q_proj, enc), hd), attn.norm_added_q.weight, attn.norm_added_q.eps)
        ek = _rms(_heads(lin(attn.add_k_proj, enc), hd), attn.norm_added_k.weight, attn.norm_added_k.eps)
        ev = _heads(lin(attn.add_v_proj, enc), hd)
        joint = _sdpa(_rope(torch.cat([eq, q], 1), *rope), _rope(torch.cat([ek, k], 1), *rope), torch.cat([ev, v], 1))
        style = _style_reference(q, emb, block, 0.7)
        want_img = lin(attn.to_out[0], joint[:, 4:] + style)
        want_enc = lin(attn.to_add_out, joint[:, :4])
        # the style branch alone involves no RoPE: it must agree to float64 precision
        assert torch.allclose(block.style_attention(q, emb) * 0.7, style, atol=1e-12, rtol=0)
    # diffusers applies RoPE in float32 even for float64 inputs: the full block agrees to ~1e-7
    torch.testing.assert_close(img_out, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc_out, want_enc, atol=1e-5, rtol=0)
    assert style.abs().max() > 0.1 and lin(attn.to_out[0], style).abs().max() > 0.05  # the style term matters


def test_single_block_style_attention_golden(calligrapher):
    """A single-stream block: the style attends from the whole text+image sequence, added before the
    block's own output projection (which the processor does not apply)."""
    names = list(calligrapher.transformer.attn_processors)
    assert names[-1] == "single_transformer_blocks.0.attn.processor"
    attn = copy.deepcopy(calligrapher.transformer.single_transformer_blocks[0].attn).double()
    block = _style_block(calligrapher.adapter.ip_adapter[-1], 1.3)
    g, dim, rope, emb = _golden_inputs(attn, text_len=4, image_len=6, seed=1)
    x = torch.randn(2, 10, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = block.attend(attn, x, None, None, rope, emb)
        hd = attn.head_dim
        lin = lambda m, t: t @ m.weight.T + (m.bias if m.bias is not None else 0)  # noqa: E731
        q = _rms(_heads(lin(attn.to_q, x), hd), attn.norm_q.weight, attn.norm_q.eps)
        k = _rms(_heads(lin(attn.to_k, x), hd), attn.norm_k.weight, attn.norm_k.eps)
        v = _heads(lin(attn.to_v, x), hd)
        want = _sdpa(_rope(q, *rope), _rope(k, *rope), v) + _style_reference(q, emb, block, 1.3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.fixture()
def _restore_attention_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.slow
def test_attention_backend_reaches_the_style_processors(tiny_models, calligrapher, _restore_attention_backend):
    """``set_attention_backend`` reaches every installed processor and both attention calls use it;
    scale 0 stays bit-exact with diffusers' own processors under the same backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    cond, latents = _batch(calligrapher)
    calligrapher.adapter.set_scale(0.0)
    with torch.no_grad():
        native = calligrapher.velocity(latents, 0.6, cond)
    calligrapher.transformer.set_attention_backend("_native_math")
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # only the processors know it
    procs = list(calligrapher.transformer.attn_processors.values())
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in procs)
    with torch.no_grad():
        math = calligrapher.velocity(latents, 0.6, cond)
    assert not torch.equal(math, native)  # the math kernel rounds differently: the backend was used
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(tiny_models["flux"], subfolder="transformer")
    base.set_attention_backend("_native_math")
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    with torch.no_grad():
        want = base(hidden_states=torch.cat([latents, cond.cond_latents], -1), timestep=torch.full((2,), 0.6),
                    guidance=cond.guidance, pooled_projections=cond.pooled_prompt_embeds,
                    encoder_hidden_states=cond.prompt_embeds, txt_ids=cond.text_ids, img_ids=cond.img_ids,
                    return_dict=False)[0]
    assert torch.equal(math, want)
    # the style branch uses it too: a backend with no CPU kernel fails in the style call as well
    calligrapher.adapter.set_scale(1.0)
    for p in procs:
        p._attention_backend = AttentionBackendName._NATIVE_EFFICIENT
    with pytest.raises(RuntimeError, match="No viable backend"):
        with torch.no_grad():
            calligrapher.adapter.ip_adapter[0].style_attention(
                torch.randn(1, 4, 2, 16), torch.randn(1, 8, 32), backend=procs[0]._attention_backend)
    with pytest.raises(RuntimeError, match="No viable backend"):
        with torch.no_grad():
            calligrapher.velocity(latents, 0.6, cond)
