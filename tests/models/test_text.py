"""The text encoder's context: token counts before truncation, what a cut caption looks like, and
the context sized from a data set's captions (clip.context_length=0)."""

import pytest

from pipeline.models.text import (AUTO_CONTEXT_MAX, AUTO_CONTEXT_MIN, TinyClipConfig, auto_context_length,
                                  build_text_encoder, truncation)


@pytest.fixture(scope="module")
def encoder():
    config = TinyClipConfig(image_size=16, patch_size=4, context_length=8, width=32, layers=1, embed_dim=32)
    return build_text_encoder({"kind": "tiny", "config": vars(config)})


def test_token_counts_include_start_and_end_and_tell_cut_captions(encoder):
    short, exact, long = "a red circle", "a b c d e f", "a photo of a forest, number 7, on a misty morning"
    counts = encoder.token_counts(["", short, exact, long])
    assert counts[:3] == [2, 5, 8]  # start + words + end; "" is start + end
    assert counts[3] > 8
    assert encoder.truncated(["", short, exact, long]) == [False, False, False, True]
    ids = encoder.tokenize([exact, long])
    assert (ids[0] != 0).all()  # a caption of exactly the context fills it, nothing lost
    assert ids[1, -1] == encoder.tokenizer.eot_token_id  # a cut caption still ends with <end_of_text>


@pytest.mark.parametrize("counts, context", [
    ([], AUTO_CONTEXT_MIN),
    ([5, 9, 12], AUTO_CONTEXT_MIN),  # short captions: never below the minimum
    ([30] * 50 + [24] * 50, 30),  # the longest, when it is common
    ([20] * 99 + [60], 20),  # one outlier in a hundred does not widen every caption's context
    ([20] * 98 + [60] * 2, 60),  # two in a hundred do
    ([200] * 10, AUTO_CONTEXT_MAX),  # CLIP's own context at most
])
def test_context_sized_from_captions_holds_99_percent_within_bounds(counts, context):
    assert auto_context_length(counts) == context


def test_truncation_reports_the_fraction_and_names_the_key(capsys):
    assert truncation([4, 9, 16, 17], 16) == {"captions_truncated": 0.25}
    assert "clip.context_length" in capsys.readouterr().out
    assert truncation([4, 16], 16) == {"captions_truncated": 0.0}
    assert capsys.readouterr().out == ""
