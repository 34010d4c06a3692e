"""`evaluate.encoder` parsed: which encoder's feature space the quality figures are in, and the
names its metrics carry (pipeline/evaluation.py computes them). Apart from the encoders themselves,
so that what only hands the choice on (the ldm's training workers, the stages' plans) does not
import open_clip and torchvision."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.stages.cache import file_digest


def clean_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class EncoderSpec:
    """What `evaluate.encoder` names, parsed; `own_clip_dir` is the run's text encoder directory."""

    kind: str  # "clip" (the run's own), "open_clip" or "inception"
    own_clip_dir: str
    model: str = ""
    file: str = ""

    @classmethod
    def parse(cls, text: str, own_clip_dir: str | Path) -> "EncoderSpec":
        own = str(own_clip_dir)
        if not text:
            return cls("clip", own)
        kind, _, rest = text.partition(":")
        if kind == "open_clip" and ":" in rest:
            model, file = rest.split(":", 1)
            spec = cls("open_clip", own, model=model, file=file)
        elif kind == "inception" and rest:
            spec = cls("inception", own, file=rest)
        else:
            raise ValueError(f"evaluate.encoder={text!r}: expected '' (the run's own CLIP), "
                             f"'open_clip:<model>:<checkpoint file>' or 'inception:<state dict file>'")
        if not Path(spec.file).is_file():
            raise FileNotFoundError(f"evaluate.encoder={text!r}: no such file {spec.file}")
        return spec

    def own_clip_name(self) -> str:
        return f"clip-{file_digest(Path(self.own_clip_dir) / 'model.safetensors')[:6]}"

    @property
    def fd_name(self) -> str:
        """The FD encoder's name, as the metrics spell it."""
        if self.kind == "clip":
            return self.own_clip_name()
        return "inception" if self.kind == "inception" else clean_name(self.model)

    @property
    def score_name(self) -> str:
        """The CLIP score's encoder: the given CLIP, or the run's own when the FD encoder has no text tower."""
        return self.fd_name if self.kind == "open_clip" else self.own_clip_name()

    @property
    def identity(self) -> str:
        """What the real images' cached features depend on: the encoder's bytes."""
        files = [Path(self.own_clip_dir) / "model.safetensors"] + ([Path(self.file)] if self.file else [])
        return f"{self.kind}:{self.model}:" + ":".join(file_digest(f) for f in files)
