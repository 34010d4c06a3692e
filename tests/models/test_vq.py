"""The VQ first stage's architecture knobs: widths per resolution and a residual stack of codebooks,
and that a model saved before they existed still loads as what it was."""

import json

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.vq import VQModel, VQModelConfig
from pipeline.stages.vq import evaluate


def images(n: int = 16, side: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=gen) * 2 - 1


def test_widths_grow_where_the_maps_shrink_and_the_latents_keep_their_shape():
    torch.manual_seed(0)
    model = VQModel(VQModelConfig(hidden_channels=8, channel_mult=[1, 2, 4], latent_channels=3))
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 3]  # full, 1/2, 1/4 resolution, then the latents
    assert model.encode(images()).shape == (16, 3, 4, 4)
    recon, indices, _ = model(images())
    assert recon.shape == (16, 3, 16, 16) and indices.shape == (16, 4, 4, 1)
    # The last multiple holds below it: the same list at downsample 8.
    assert VQModelConfig(hidden_channels=8, channel_mult=[1, 1, 2], downsample=8).widths() == [8, 8, 16, 16]


def test_more_codebooks_in_the_residual_stack_quantize_the_latents_more_exactly():
    latents = torch.randn(32, 4, 8, 8)
    errors = []
    for books in (1, 2, 4):
        torch.manual_seed(0)
        model = VQModel(VQModelConfig(hidden_channels=8, codebook_size=16, num_quantizers=books))
        model.train()
        model.quantize(latents)  # k-means initialises each codebook on these latents
        model.eval()
        quantized, indices, _ = model.quantize(latents)
        assert indices.shape == (32, 8, 8, books)
        errors.append((quantized - latents).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_codebook_usage_is_the_mean_over_the_codebooks_of_a_stack():
    torch.manual_seed(0)
    model = VQModel(VQModelConfig(hidden_channels=8, codebook_size=16, num_quantizers=2))
    batch = images(8)
    model.train()
    model(batch)
    model.eval()
    with torch.no_grad():
        _, indices, _ = model(batch)
    expected = sum(len(set(indices[..., q].flatten().tolist())) for q in range(2)) / 32
    assert evaluate(model, [batch])["codebook_usage"] == pytest.approx(expected)


def test_a_model_saved_before_widths_and_stacks_loads_as_the_plain_vq(tmp_path):
    torch.manual_seed(0)
    model = VQModel(VQModelConfig(hidden_channels=8))
    batch = images(4)
    model(batch)  # k-means initialises the codebook (in training mode)
    model.eval().save(tmp_path, latent_scale=0.5)
    meta = json.loads((tmp_path / "model.json").read_text())
    for key in ("channel_mult", "num_quantizers"):  # what model.json held before
        del meta["config"][key]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded, extra = VQModel.load(tmp_path)
    assert extra == {"latent_scale": 0.5}
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(batch)), model.decode(model.encode(batch)))


@pytest.mark.parametrize("override, message", [
    ("vq.channel_mult=[1,2,2,4]", r"vq\.channel_mult must be at most 3 multiples"),
    ("vq.channel_mult=[1,0,2]", r"vq\.channel_mult must be at most 3 multiples"),
    ("vq.num_quantizers=0", r"vq\.num_quantizers must be >= 1"),
])
def test_bad_widths_or_stacks_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
