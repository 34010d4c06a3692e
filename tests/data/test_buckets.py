"""Aspect-ratio buckets: the table, which bucket an image goes to, and how little of it is cropped."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.buckets import bucket_table, fit_to_bucket, max_crop, nearest_bucket, trained_sizes, training_buckets
from pipeline.data.decode import load_fitted, load_image


def test_the_table_has_about_equal_pixels_multiples_of_what_the_models_need_and_both_orientations():
    table = bucket_table(32, 8, 2.0)
    assert table == [(24, 48), (24, 40), (32, 32), (40, 24), (48, 24)]
    for size in (48, 64, 256):
        multiple = 8 if size < 256 else 32
        table = bucket_table(size, multiple, 2.0)
        assert (size, size) in table and sorted((h, w) for w, h in table) == sorted(table)
        for w, h in table:
            assert w % multiple == 0 and h % multiple == 0 and max(w / h, h / w) <= 2.0
            assert abs(w * h / size**2 - 1) < 0.2  # about the same pixel count
    assert bucket_table(32, 8, 1.0) == [(32, 32)]


def test_an_image_goes_to_the_bucket_nearest_its_aspect_and_loses_little():
    table = bucket_table(48, 8, 2.0)  # 32x64, 40x56, 48x48, 56x40, 64x32
    assert nearest_bucket(100, 50, table) == (64, 32) and nearest_bucket(50, 100, table) == (32, 64)
    assert nearest_bucket(30, 30, table) == (48, 48) and nearest_bucket(50, 30, table) == (56, 40)
    assert fit_to_bucket(100, 50, (64, 32)).crop == 0.0
    fit = fit_to_bucket(50, 30, (56, 40))
    assert fit.box == pytest.approx((4.0, 0.0, 46.0, 30.0)) and fit.crop == pytest.approx(0.16)
    # Any aspect up to 2:1 loses at most the table's bound, far less than a square crop would.
    bound = max_crop(table, 2.0)
    for aspect in np.exp(np.linspace(-np.log(2), np.log(2), 101)):
        w, h = round(1000 * aspect), 1000
        assert fit_to_bucket(w, h, nearest_bucket(w, h, table)).crop <= bound + 1e-3
    assert bound < 0.17 < fit_to_bucket(100, 50, (48, 48)).crop


def _png(w: int, h: int) -> bytes:
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = (255, 0, 0)  # left half red, right half blue
    pixels[:, w // 2:] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_wide_image_is_decoded_at_its_bucket_whole_not_centre_cropped():
    table = bucket_table(48, 8, 2.0)
    image, crop = load_fitted(_png(200, 100), table)
    assert image.shape == (32, 64, 3) and crop == 0.0
    assert image[:, :30, 0].min() > 200 and image[:, 34:, 2].min() > 200  # both halves kept
    square = load_image(_png(200, 100), 48)  # the square path: the middle half only
    assert square.shape == (48, 48, 3)
    tall, crop = load_fitted(_png(100, 200), table)
    assert tall.shape == (64, 32, 3) and crop == 0.0


def test_config_names_a_bad_bucket_and_square_turns_them_off():
    cfg = load_config(None, ["data.buckets=square"])
    assert training_buckets(cfg.data, 8) == [(32, 32)]
    cfg = load_config(None, ["data.buckets=48x24,24x48,32x32"])
    assert training_buckets(cfg.data, 8) == [(24, 48), (32, 32), (48, 24)]
    with pytest.raises(ConfigError, match="48x20 has a side that is not a multiple of 8"):
        training_buckets(load_config(None, ["data.buckets=48x20"]).data, 8)
    with pytest.raises(ConfigError, match="data.buckets"):
        load_config(None, ["data.buckets=wide"])
    with pytest.raises(ConfigError, match="data.max_aspect"):
        load_config(None, ["data.max_aspect=0.5"])


def test_the_sizes_a_run_trains_are_the_buckets_with_a_global_batch():
    buckets = {"32x64": {"samples": 30}, "48x48": {"samples": 5}, "64x32": {"samples": 41}}
    trained = trained_sizes(buckets, 10)
    assert trained["bucket_batches_per_epoch"] == {"32x64": 3, "48x48": 0, "64x32": 4}
    assert trained["samples_unused_per_epoch"] == 5 + 1
    assert trained["sizes"] == ["32x64", "64x32"] and trained["default_size"] == "64x32"
