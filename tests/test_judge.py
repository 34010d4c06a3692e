"""The quality benchmark's judge, on the real emoji images (`make benchmark-data`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import emoji as E
from pipeline.judge import NearestImageJudge


@pytest.fixture(scope="module")
def gallery():
    emoji, images = E.load_gallery(E.require(), 32)
    return emoji, images, NearestImageJudge(images, [e.key for e in emoji])


def test_judge_recognises_real_images_and_not_wrong_ones(gallery):
    emoji, images, judge = gallery
    keys = [e.key for e in emoji]
    assert judge.judge(images, keys).figures()["fidelity"] == 1.0
    rng = np.random.default_rng(0)
    # What a sample of the right image looks like: noisy, off by a pixel. The judge still names it.
    noisy = np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    assert judge.judge(noisy, keys).figures()["fidelity"] > 0.98
    assert judge.judge(np.roll(images, 1, axis=2), keys).figures()["fidelity"] > 0.95
    # Another emoji's image, or a blank one, is not the named image (chance is 1/3775).
    wrong = judge.judge(images[rng.permutation(len(keys))], keys).figures()
    assert wrong["fidelity"] < 0.01 and wrong["fidelity_top5"] < 0.01
    blank = np.full_like(images[:100], 255)
    assert judge.judge(blank, keys[:100]).figures()["fidelity"] <= 0.02


def test_fidelity_comes_with_its_standard_error(gallery):
    # Half of 400 images right: 0.5 +- sqrt(0.25 / 400) = 0.025; every one right: no spread.
    emoji, images, judge = gallery
    keys = [e.key for e in emoji]
    shown = np.concatenate([images[:200], images[201:401]])
    figures = judge.judge(shown, keys[:400]).figures()
    assert figures["fidelity"] == 0.5 and figures["n"] == 400
    assert figures["fidelity_se"] == pytest.approx(0.025)
    assert judge.judge(images[:50], keys[:50]).figures()["fidelity_se"] == 0.0


def test_judge_tells_skin_tones_apart(gallery):
    emoji, images, judge = gallery
    toned = [i for i, e in enumerate(emoji) if e.tone in E.SKIN_TONES.values()]
    verdicts = judge.judge(images[toned], [emoji[i].key for i in toned])
    assert verdicts.correct.all()
    # The same emoji in the neighbouring tone is judged wrong for the named tone.
    by_pair = {(e.base, e.tone): i for i, e in enumerate(emoji)}
    tones = list(E.SKIN_TONES.values())
    swapped = [(by_pair[(emoji[i].base, tones[(tones.index(emoji[i].tone) + 1) % 5])], emoji[i].key)
               for i in toned if (emoji[i].base, tones[(tones.index(emoji[i].tone) + 1) % 5]) in by_pair]
    shown, named = zip(*swapped)
    assert judge.judge(images[list(shown)], list(named)).figures()["fidelity"] < 0.05


def test_judge_refuses_bad_input(gallery):
    emoji, images, judge = gallery
    with pytest.raises(KeyError, match="not in the gallery"):
        judge.judge(images[:1], ["no-such-emoji"])
    with pytest.raises(ValueError, match="gallery"):
        judge.judge(images[:2, :16, :16], [emoji[0].key, emoji[1].key])
    with pytest.raises(ValueError, match="distinct key"):
        NearestImageJudge(images[:6], ["a"] * 6)
