"""A learning test scored by the sampler, not by the training loss: after a few supervised steps on
one sample, the clean latent the model predicts from fresh noise is closer to the truth (docs/ARCHITECTURE.md §6)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from train.config import parse_args
from train.data.preprocess import collate_samples
from train.data.synthesize import synthesize
from train.flow_matching import pixel_mask_to_tokens
from train.tests.train_helpers import tiny_train_args
from train.trainer import Trainer

HELD_OUT_SIGMAS = (0.3, 0.6, 0.9)
DRAWS = 8
STEPS = 20


def sampling_error(trainer, batch) -> float:
    """Relative squared error of the sampler's clean-latent estimate ``x0_hat = x_t - sigma * v``,
    averaged over fresh noise draws at each of a few noise levels, against the true clean latent,
    over the source region (computed by hand, not with the training code).

    Averaging over the draws removes the part of the error no model can predict (the noise
    itself) and leaves what training must fix: a model that learned ``eps - x0`` centres its
    estimates on x0; one that learned the reversed target centres them on ``(1 - 2 sigma) x0``.
    """
    model = trainer.model
    embeds, pooled, text_ids = trainer.prompts.get(batch.texts)
    cond = model.prepare_condition(batch.image, batch.mask, embeds, pooled, text_ids,
                                   model.encode_style(batch.style_images), guidance_scale=trainer.cfg.guidance_scale)
    cond = cond.select([0] * DRAWS)
    x0 = model.encode_latents(batch.image).double()
    region = torch.zeros_like(batch.mask)
    for i, (left, top, right, bottom) in enumerate(batch.source_boxes):
        region[i, :, top:bottom, left:right] = 1
    keep = pixel_mask_to_tokens(region)[0] > 0.5
    g = torch.Generator().manual_seed(987_654)
    errors = []
    with torch.no_grad():
        for sigma in HELD_OUT_SIGMAS:
            eps = torch.randn((DRAWS, *x0.shape[1:]), generator=g, dtype=torch.float64)
            x_t = (1 - sigma) * x0 + sigma * eps
            v = model.velocity(x_t.float(), torch.full((DRAWS,), sigma), cond, adapter=trainer.adapter).double()
            x0_hat = (x_t - sigma * v).mean(0, keepdim=True)
            errors.append(((x0_hat - x0)[:, keep].square().sum() / x0[:, keep].square().sum()).item())
    return sum(errors) / len(errors)


def unit_latent_flux(tiny_models, data, out):
    """A copy of the tiny FLUX-Fill whose VAE normalisation gives the data's latents mean 0 and std 1,
    as FLUX's shift/scaling factors do for real images (the random tiny VAE's latents are ~0.1)."""
    from diffusers import AutoencoderKL

    from train.data.dataset import CalligraphyDataset, load_records

    flux = shutil.copytree(tiny_models["flux"], out)
    vae = AutoencoderKL.from_pretrained(flux / "vae")
    image = collate_samples([CalligraphyDataset(load_records(data, resolution=64), resolution=64,
                                                strip_height=16)[0]]).image
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mode()
    config = json.loads((flux / "vae" / "config.json").read_text())
    config.update(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    (flux / "vae" / "config.json").write_text(json.dumps(config))
    return flux


@pytest.mark.slow
def test_training_lowers_the_sampling_error_on_held_out_noise(tiny_models, tmp_path):
    data = synthesize(tmp_path / "data", num=1, resolution=64, seed=5)
    models = dict(tiny_models, flux=unit_latent_flux(tiny_models, data, tmp_path / "flux"))
    cfg = parse_args(tiny_train_args(models, data, tmp_path / "run", STEPS, learning_rate=1e-2,
                                     checkpointing_steps=1000))
    trainer = Trainer(cfg)
    trainer.setup()
    batch = collate_samples([trainer.dataset[0]])
    before = sampling_error(trainer, batch)
    trainer.run()
    after = sampling_error(trainer, batch)
    assert after < 0.9 * before, (before, after)  # about 0.8 after 20 steps; a reversed target rises above 1


def test_one_training_step_computes_the_flow_matching_loss_by_hand(tiny_models, tmp_path):
    """The supervised loss of a micro-batch equals a from-scratch computation: keyed noise and
    noise level, x_t on the straight line, target eps - x0, mask-weighted MSE over the source region."""
    from train.supervised import supervised_loss, training_sigmas
    from train.rng import sample_generator

    data = synthesize(tmp_path / "data", num=2, resolution=64, seed=5)
    cfg = parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 1, masked_loss_weight=3.0))
    trainer = Trainer(cfg)
    trainer.setup()
    sigmas = training_sigmas(trainer.model)
    batch = collate_samples([trainer.dataset[0], trainer.dataset[1]])
    keys = [(3, 5), (7, 1)]
    with torch.no_grad():
        got = supervised_loss(trainer, batch, keys, sigmas).item()

    model = trainer.model
    embeds, pooled, text_ids = trainer.prompts.get(batch.texts)
    styles = torch.cat([model.encode_style([image]) for image in batch.style_images])
    cond = model.prepare_condition(batch.image, batch.mask, embeds, pooled, text_ids, styles,
                                   guidance_scale=cfg.guidance_scale)
    x0 = model.encode_latents(batch.image)
    losses = []
    for i, (epoch, position) in enumerate(keys):
        g = sample_generator(cfg.seed, epoch, position)
        eps = torch.randn(x0.shape[1:], generator=g)
        u = torch.sigmoid(torch.randn((), generator=g)).item()
        sigma = sigmas[min(int(u * len(sigmas)), len(sigmas) - 1)]
        x_t = (1 - sigma) * x0[i] + sigma * eps
        with torch.no_grad():
            v = model.velocity(x_t[None], sigma[None], cond.select([i]), adapter=trainer.adapter)[0]
        err = (v - (eps - x0[i])).square().mean(-1)
        blocks = lambda m: m.unfold(0, 16, 16).unfold(1, 16, 16).mean((-1, -2)).flatten()  # noqa: E731
        region = torch.zeros_like(batch.mask[i, 0])
        left, top, right, bottom = batch.source_boxes[i]
        region[top:bottom, left:right] = 1
        w = blocks(region) * (1 + 2.0 * blocks(batch.mask[i, 0]))
        assert w.min() == 0 and w.max() > 1  # the strip weighs nothing, the mask 3x
        losses.append(((w * err).sum() / w.sum()).item())
    assert got == pytest.approx(sum(losses) / 2, rel=1e-4)
