"""Quality figures of a text-to-image model: FD and CLIP score in a named encoder's feature space.

- **FD**, the Fréchet distance between Gaussians fitted to the features of generated and of real
  (held-out) images: ||mu_g - mu_r||² + Tr(S_g + S_r - 2 (S_g S_r)^½). In Inception's pool features
  it is the usual FID; in a CLIP image tower's, FD-CLIP. Lower is better.
- **CLIP score**: 100 x the mean cosine (clamped at 0, as torchmetrics does) between each image's
  embedding and its caption's, in a CLIP model. Higher is better.

Figures in different encoders' spaces cannot be compared, so each metric's name carries the name of
its encoder (`encoder_name`): `fd_<encoder>_g3`, `clip_score_<encoder>_g3`. `evaluate.encoder` names it:

- '' (default): the run's own CLIP (the package's text encoder, image tower included), named
  `clip-<first 6 hex of its weights' sha256>`: runs that share a clip stage compare, others do not;
- 'open_clip:<model>:<file>': an open_clip model from a local checkpoint file, named `<model>`;
- 'inception:<file>': torchvision's Inception-v3 from a local state dict file (FID's network), named
  `inception`; it has no text tower, so the CLIP score stays with the run's own CLIP.

No Ray or MLflow here: the stage (pipeline/stages/evaluate.py) runs these in Ray tasks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.config.encoder import EncoderSpec
from pipeline.models.text import TextEncoder, clip_image_preprocess, resize_for_clip

INCEPTION_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"FD needs at least 2 feature vectors, got an array of shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1^½ S2 S1^½)^½).

    Tr((S1 S2)^½) is computed as the sum of the square roots of the eigenvalues of the symmetric
    S1^½ S2 S1^½ (the same eigenvalues as S1 S2), so a singular covariance (fewer images than
    feature dimensions) gives no complex parts, unlike scipy's sqrtm of the product."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def fd_of(generated: np.ndarray, real: np.ndarray) -> float:
    return frechet_distance(*feature_stats(generated), *feature_stats(real))


class Encoders:
    """The FD encoder's image features and the CLIP score's image and text embeddings, on one device."""

    def __init__(self, spec: EncoderSpec, device: torch.device):
        self.spec, self.device = spec, device
        own = TextEncoder.load(spec.own_clip_dir).to(device).eval()
        if spec.kind == "open_clip":
            from pipeline.models.text import build_text_encoder

            self.score_clip = build_text_encoder({"kind": "open_clip", "model": spec.model},
                                                 pretrained=spec.file).to(device).eval()
        else:
            self.score_clip = own
        self.inception = _load_inception(spec.file).to(device).eval() if spec.kind == "inception" else None

    @torch.no_grad()
    def fd_features(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> (B, D) float32 features of the FD encoder."""
        images = images.to(self.device)
        if self.inception is None:
            return self._clip_image(images).float().cpu().numpy()
        x = F.interpolate((images + 1) / 2, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
        return self.inception((x - mean) / std).float().cpu().numpy()

    def _clip_image(self, images: torch.Tensor) -> torch.Tensor:
        clip = self.score_clip.clip
        size = clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return clip.encode_image(clip_image_preprocess(resize_for_clip(images, size)), normalize=True)

    @torch.no_grad()
    def clip_scores(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Per image: 100 x max(cos(image, caption), 0) in the CLIP score's model."""
        image = self._clip_image(images.to(self.device))
        text = F.normalize(self.score_clip.clip.encode_text(self.score_clip.tokenize(captions).to(self.device)), dim=-1)
        return (100 * (image * text).sum(dim=-1).clamp(min=0)).float().cpu().numpy()


def _load_inception(file: str) -> torch.nn.Module:
    """torchvision's Inception-v3 with a local state dict (safetensors, or torch weights only); its
    2048-d pool features (the classifier removed), as FID uses."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("AuxLogits.")] or unexpected:
        raise ValueError(f"evaluate.encoder: {file} is not an Inception-v3 state dict (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.fc = torch.nn.Identity()
    return model
