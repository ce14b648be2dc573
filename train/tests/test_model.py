"""The style-adapter model on tiny real FLUX.1-Fill / SigLIP components (SPEC §3)."""

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
