"""The VQGAN objective of the vq stage (`vq.loss=vqgan`): discriminator, warm-up, adaptive weight."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipeline.config import ConfigError, load_config
from pipeline.models.vq import VQModel, VQModelConfig
from pipeline.training.vqgan import PatchDiscriminator, VQGANObjective, VQLoss, adaptive_weight, hinge_d_loss


def test_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(channels=8, layers=2)
    logits, feats = d.features(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 1, 6, 6) and len(feats) == 3
    assert PatchDiscriminator(channels=8, layers=3)(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_hinge_loss_is_zero_only_past_the_margins():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    rec, adv = layer(x).pow(2).mean(), -layer(x).mean() * 3
    expected = (torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
                / (torch.autograd.grad(adv, layer.weight, retain_graph=True)[0].norm() + 1e-4))
    assert adaptive_weight(rec, adv, layer.weight, 0.5).item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_discriminator_waits_for_the_warm_up_then_learns_real_from_reconstructed():
    torch.manual_seed(0)
    vq = VQModel(VQModelConfig(hidden_channels=8, codebook_size=16))
    gan = VQGANObjective(VQLoss(loss="vqgan", disc_start=3, disc_channels=8), torch.device("cpu"), lr=2e-3)
    optimizer = torch.optim.Adam(vq.parameters(), lr=1e-3)
    # Real images are smooth; the untrained decoder's are noise: easy to tell apart.
    images = F.interpolate(torch.rand(16, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    before = [p.detach().clone() for p in gan.core.parameters()]
    d_losses = []
    for step in range(40):
        recon, _, commit = vq(images)
        loss, metrics = gan.generator_loss(images, recon, F.mse_loss(recon, images), vq.decoder[-1].weight)
        assert ("g_loss" in metrics) == (step >= 3) and "perceptual_loss" in metrics
        optimizer.zero_grad(set_to_none=True)
        (loss + commit).backward()
        optimizer.step()
        d_metrics = gan.discriminator_step()
        if step < 3:
            assert d_metrics == {}
            assert all(torch.equal(b, p) for b, p in zip(before, gan.core.parameters()))
        else:
            d_losses.append(d_metrics["d_loss"])
            assert metrics["adv_weight"] >= 0
    assert d_losses[0] > 0.8 and min(d_losses[-5:]) < 0.5 * d_losses[0]


def test_vq_loss_keys_are_checked():
    assert load_config(None, ["vq.loss=vqgan"]).vq.loss == "vqgan"
    with pytest.raises(ConfigError, match="vq.loss must be 'mse' or 'vqgan'"):
        load_config(None, ["vq.loss=lpips"])
    with pytest.raises(ConfigError, match="disc_start=2000 is not below vq.max_steps=1600"):
        load_config(None, ["vq.loss=vqgan", "vq.disc_start=2000"])
