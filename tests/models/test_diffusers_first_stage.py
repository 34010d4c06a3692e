"""A diffusers VQModel or AutoencoderKL as the first stage (`vq.pretrained`), loaded from a local
directory the test saves from a small random model: our calls give diffusers' own results."""

import json

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.diffusers_first_stage import DiffusersFirstStage
from pipeline.models.vq import VQModel
from pipeline.stages.vq import evaluate, measure_latent_scale, pretrained_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BLOCKS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def diffusers_model(kind: str):
    import diffusers

    torch.manual_seed(0)
    if kind == "VQModel":
        return diffusers.VQModel(**BLOCKS, num_vq_embeddings=16, vq_embed_dim=4).eval()
    return diffusers.AutoencoderKL(**BLOCKS).eval()


def reference_roundtrip(model, images):
    """Encode -> decode the way diffusers does it: pre-quantization latents (VQ), posterior mean (KL)."""
    if type(model).__name__ == "VQModel":
        return model.decode(model.encode(images).latents).sample
    return model.decode(model.encode(images).latent_dist.mode()).sample


@pytest.fixture(params=["VQModel", "AutoencoderKL"])
def saved(request, tmp_path):
    model = diffusers_model(request.param)
    layout = tmp_path / "pipeline"  # a pipeline directory: the autoencoder in vae/
    model.save_pretrained(layout / "vae", safe_serialization=True)
    return request.param, model, layout


def test_our_encode_and_decode_are_diffusers_own(saved, tmp_path):
    kind, model, directory = saved
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ours, meta = VQModel.load(directory)
    assert isinstance(ours, DiffusersFirstStage) and meta == {}
    assert (ours.cfg.downsample, ours.cfg.latent_channels) == (2, 4)
    with torch.no_grad():
        expected = reference_roundtrip(model, images)
        assert expected.abs().max() > 0
        torch.testing.assert_close(ours.decode(ours.encode(images)), expected, rtol=0, atol=1e-6)
        # Saved in the pipeline's layout with its measured scale, as the vq stage does, and back.
        scale = measure_latent_scale(ours, [images])
        ours.save(tmp_path / "vq", latent_scale=scale)
        again, meta = VQModel.load(tmp_path / "vq")
        assert meta == {"latent_scale": scale} and scale > 0
        assert json.loads((tmp_path / "vq" / "model.json").read_text())["kind"] == "diffusers"
        torch.testing.assert_close(again.decode(again.encode(images)), expected, rtol=0, atol=1e-6)
        metrics = evaluate(again, [images])
    assert metrics["psnr"] > 0
    assert ("codebook_usage" in metrics) == (kind == "VQModel")  # a KL latent space has no codes


def test_vq_pretrained_takes_a_diffusers_directory_and_checks_its_downsampling(saved):
    _, _, directory = saved
    cfg = load_config(None, [f"vq.pretrained={directory}", "data.image_size=32"])
    assert pretrained_dir(cfg) == directory / "vae"
    with pytest.raises((ConfigError, ValueError), match="downsampling of vq.pretrained"):
        pretrained_dir(load_config(None, [f"vq.pretrained={directory}", "data.image_size=10"]))


def test_a_diffusers_directory_without_safetensors_weights_is_refused(tmp_path):
    model = diffusers_model("AutoencoderKL")
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors weights are required"):
        VQModel.load(tmp_path)


def test_a_model_carrying_a_diffusers_first_stage_declares_diffusers(saved, tmp_path):
    from pipeline.components import extras_for, model_requirements

    _, _, directory = saved
    ours, _ = VQModel.load(directory)
    ours.save(tmp_path / "package" / "vq", latent_scale=1.0)  # as the pipeline package holds it
    assert extras_for({"pipeline": str(tmp_path / "package")}) == ("diffusers",)
    assert extras_for({"pipeline": str(tmp_path)}) == ()
    plain, with_diffusers = model_requirements(), model_requirements(("diffusers",))
    assert [r for r in with_diffusers if r not in plain] == [r for r in with_diffusers if r.startswith("diffusers==")]
    assert not any(r.startswith("diffusers") for r in plain)
    assert any(r.startswith("diffusers==") for r in with_diffusers)
