"""Style prompts, blends and finetune steering."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.styles import RampState, SteeringAssets, StyleModel, StyleRamp, blend
from serve_app.styles.prompts import parse_styles


def test_parse_styles_like_the_prototype():
    assert parse_styles("ambient, techno", "1.0, 0.5") == [("ambient", 1.0), ("techno", 0.5)]
    assert parse_styles("jazz", None) == [("jazz", 1.0)]
    with pytest.raises(ValueError, match="style_weights: 'x' is not a number"):
        parse_styles("jazz", "x")
    with pytest.raises(ValueError, match="style_weights: got 2 weights for 1 styles"):
        parse_styles("jazz", "1,2")
    with pytest.raises(ValueError, match="styles: at most 2 styles"):
        parse_styles("a,b,c", None, max_styles=2)
    for text in ("nan", "inf", "-Infinity"):  # float() reads them; a blend of NaNs plays
        with pytest.raises(ValueError, match=f"style_weights: '{text}' is not a finite number"):
            parse_styles("jazz", text)


def test_blend_is_normalised_and_steerable():
    a, b = np.ones(768, np.float32), np.zeros(768, np.float32)
    np.testing.assert_allclose(blend([a, b], [1.0, 1.0]), 0.5)
    np.testing.assert_allclose(blend([a, b], [10.0, 10.0]), 0.5)
    # weights are relative at any size: two of 1e308 summed to inf and blended to zeros
    np.testing.assert_allclose(blend([a, b], [1e308, 1e308]), 0.5)
    np.testing.assert_allclose(blend([a, b], [5e-324, 5e-324]), 0.5)  # subnormal
    steering = SteeringAssets(mean=np.full(768, 2.0, np.float32),
                              centroids=np.stack([np.full(768, 4.0, np.float32)] * 2))
    np.testing.assert_allclose(blend([a], [1.0], steering=steering, mean=1.0), 1.5)
    np.testing.assert_allclose(
        blend([a], [1.0], steering=steering, centroid_weights=[0.0, 3.0]), (1 + 12) / 4
    )
    with pytest.raises(ValueError, match="centroid_weights: got 3 weights but the model has 2"):
        blend([a], [1.0], steering=steering, centroid_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="mean: this model has no mean_style_embed"):
        blend([a], [1.0], mean=0.5)
    with pytest.raises(ValueError, match="at least one style or steering weight"):
        blend([a], [0.0])
    # each named as the client wrote it (a negative centroid weight was "style_weights")
    for bad in (-1.0, float("nan"), float("inf")):  # NaN would blend to NaN silently
        with pytest.raises(ValueError, match=r"^style_weights: weights must be finite and >= 0"):
            blend([a, b], [1.0, bad])
        with pytest.raises(ValueError, match=r"^mean: weights must be finite and >= 0"):
            blend([a], [1.0], steering=steering, mean=bad)
        with pytest.raises(ValueError, match=r"^centroid_weights: .* >= 0, got \[5.0, "):
            blend([a], [1.0], steering=steering, centroid_weights=[5.0, bad])


def test_steering_assets_shapes_are_checked():
    with pytest.raises(ValueError, match=r"mean_style_embed.npy: expected shape \(768,\)"):
        SteeringAssets(mean=np.zeros(5))
    with pytest.raises(ValueError, match=r"cluster_centroids.npy: expected shape \(K, 768\)"):
        SteeringAssets(centroids=np.zeros((3, 5)))


def test_mock_style_model_is_deterministic_cached_and_keeps_global_rng():
    model = StyleModel.mock()
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    e1 = model.embed_text("disco funk")
    tokens = model.tokenize(e1)
    assert np.random.rand() == expected_next  # MockMusicCoCa's reseeding does not leak
    assert model.embed_text("disco funk") is e1 and model.cache_info().hits == 1
    assert e1.shape == (768,) and tokens.shape == (12,)
    assert ((tokens >= 0) & (tokens < 1024)).all()
    np.testing.assert_array_equal(StyleModel.mock().tokenize(e1), tokens)


def test_a_clip_reaches_musiccoca_as_upstream_would_make_it_but_resampled_by_soxr():
    from magenta_rt.audio import Waveform

    from serve_app.styles.embedder import mono_at

    rng = np.random.default_rng(0)
    t = np.arange(4 * 48000) / 48000
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.shape)
    clip = np.stack([left, 0.5 * left], 1).astype(np.float32)
    ours = mono_at(clip, 48000, 16000)
    upstream = Waveform(clip, 48000).as_mono().resample(16000).samples  # resampy
    assert ours.shape == upstream.shape == (64000, 1)
    error = np.sqrt(np.mean((ours - upstream) ** 2)) / np.sqrt(np.mean(upstream ** 2))
    # -48 dB here: the two anti-alias filters differ near 8 kHz, where the noise has energy
    assert error < 1e-2
    np.testing.assert_array_equal(mono_at(clip[:, :1], 16000, 16000), clip[:, :1])


def test_a_glide_resumed_from_its_state_goes_on_exactly_and_a_foreign_one_is_ignored():
    a, b = np.zeros(8, np.float32), np.ones(8, np.float32)
    ramp = StyleRamp(a)
    ramp.set_target(b, 1.0)  # 25 frames
    for _ in range(10):
        ramp.next_frame()
    state = ramp.state()
    assert (state.frames, state.done) == (25, 10)
    resumed = StyleRamp(b)
    resumed.resume(state)
    np.testing.assert_array_equal(resumed.current, ramp.current)
    for _ in range(20):  # the same frames on, then at the target with nothing to carry
        np.testing.assert_array_equal(resumed.next_frame(), ramp.next_frame())
    assert resumed.state() is None and np.array_equal(resumed.current, b)
    for foreign in (RampState(np.zeros(4, np.float32), 25, 10),  # another style model's
                    RampState(a, 25, 25)):  # already over
        untouched = StyleRamp(b)
        untouched.resume(foreign)
        assert untouched.state() is None and np.array_equal(untouched.current, b)
