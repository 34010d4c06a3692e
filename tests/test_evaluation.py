"""The quality figures (pipeline/evaluation.py): FD against scipy's matrix square root, the encoders
named in the metric names, CLIP scores in range, Inception from a local file, captioned grids."""

import numpy as np
import pytest
import torch

from pipeline.data.images import captioned_tile, grid_columns
from pipeline.evaluation import EncoderSpec, Encoders, fd_of, feature_stats, frechet_distance


def scipy_fd(mu1, s1, mu2, s2):
    """The formula as the FID papers' code writes it: Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_agrees_with_scipy_and_is_zero_between_a_set_and_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.5, size=(300, 16)) @ rng.normal(size=(16, 16))
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(scipy_fd(*feature_stats(a), *feature_stats(b)), rel=1e-6)
    assert fd_of(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fd_of(a, b) > 1.0


def test_fd_of_diagonal_gaussians_has_its_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)


def test_fd_with_fewer_images_than_dimensions_is_finite_and_grows_with_the_shift():
    """Held-out sets of users' data can be smaller than the feature width: singular covariances."""
    rng = np.random.default_rng(1)
    real = rng.normal(size=(20, 64))
    near, far = rng.normal(size=(20, 64)), rng.normal(loc=2.0, size=(20, 64))
    assert 0 <= fd_of(near, real) < fd_of(far, real) < np.inf
    with pytest.raises(ValueError, match="at least 2"):
        fd_of(real[:1], real)


@pytest.fixture(scope="module")
def own_clip(tmp_path_factory):
    from pipeline.models.text import TinyClipConfig, build_text_encoder

    directory = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    build_text_encoder({"kind": "tiny", "config": vars(TinyClipConfig(image_size=16, patch_size=4, width=32,
                                                                      layers=1, embed_dim=32))}).save(directory)
    return directory


def test_the_encoders_name_is_in_the_metric_and_follows_its_weights(own_clip, tmp_path):
    from pipeline.models.text import TextEncoder

    spec = EncoderSpec.parse("", own_clip)
    assert spec.fd_name == spec.score_name and spec.fd_name.startswith("clip-") and len(spec.fd_name) == 11
    other = TextEncoder.load(own_clip)
    with torch.no_grad():
        other.clip.logit_scale.add_(1.0)
    other.save(tmp_path / "other")
    assert EncoderSpec.parse("", tmp_path / "other").fd_name != spec.fd_name
    assert EncoderSpec.parse("", tmp_path / "other").identity != spec.identity  # and the cached features' key


@pytest.mark.parametrize("text, error", [("resnet:/x", ValueError), ("open_clip:ViT-B-32", ValueError),
                                         ("inception:/no/such/file.pt", FileNotFoundError)])
def test_a_bad_encoder_names_the_key(text, error, own_clip):
    with pytest.raises(error, match="evaluate.encoder"):
        EncoderSpec.parse(text, own_clip)


def test_clip_scores_are_in_range_and_favour_the_matching_caption(own_clip):
    encoders = Encoders(EncoderSpec.parse("", own_clip), torch.device("cpu"))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    features = encoders.fd_features(images)
    assert features.shape == (4, 32) and features.dtype == np.float32
    scores = encoders.clip_scores(images, ["a red circle"] * 4)
    assert scores.shape == (4,) and ((0 <= scores) & (scores <= 100)).all()
    # The score is the cosine of each image with its own caption: the same pair scores the same in any batch.
    assert encoders.clip_scores(images[:1], ["a red circle"])[0] == pytest.approx(scores[0], abs=1e-4)


def test_inception_loads_from_a_local_state_dict_and_gives_pool_features(own_clip, tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    spec = EncoderSpec.parse(f"inception:{tmp_path / 'inception.safetensors'}", own_clip)
    assert spec.fd_name == "inception" and spec.score_name.startswith("clip-")  # no text tower: own CLIP scores
    features = Encoders(spec, torch.device("cpu")).fd_features(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048)
    save_file({"conv.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        Encoders(EncoderSpec.parse(f"inception:{tmp_path / 'other.safetensors'}", own_clip), torch.device("cpu"))


def test_grids_are_near_square_keep_a_prompts_images_together_and_carry_the_prompts():
    assert grid_columns(100, 1) == 10  # not a strip of 100
    assert grid_columns(100, 4) == 20 and grid_columns(8, 4) == 8 and grid_columns(2, 2) == 2
    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(6)]
    grid = captioned_tile(images, [f"prompt {i}" for i in range(6)], ncol=3)
    rows_of_tiles = 2
    assert grid.shape[1] >= 3 * 128 and grid.shape[0] > rows_of_tiles * 128  # tiles upscaled, a caption band each
    band = grid[128 + 4:grid.shape[0] // 2, 4:128]  # under the first tile: dark text on white
    assert band.min() < 100 and (band == 255).mean() > 0.5
    with pytest.raises(ValueError, match="captions"):
        captioned_tile(images, ["one"])
