"""The batched engine on the tiny variant: audio, determinism, batching, sessions."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.engine import CapacityError, Controls, Session, batch
from serve_app.engine.variants import CHANNELS, FRAME_SAMPLES, get_variant

from .offline_decode import assert_heard_as_decoded, decode_at_once


def run(engine, frames: int) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for _ in range(frames):
        for sid, frame in engine.step().items():
            out.setdefault(sid, []).append(frame.audio)
    return {sid: np.concatenate(chunks) for sid, chunks in out.items()}


def style(tiny, text="disco funk"):
    return tiny.style.embed_text(text)


def solo(tiny, make_engine, frames: int, **session) -> np.ndarray:
    """A session's audio when it has the engine to itself (the reference)."""
    engine = make_engine()
    s = Session(style(tiny), **session)
    engine.add(s)
    return run(engine, frames)[s.id]


def assert_same_stream(got: np.ndarray, expected: np.ndarray) -> None:
    """Same tokens; the audio may differ by float noise of batched matmuls (<= 2 LSB)."""
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 2


def test_each_step_is_one_40ms_stereo_frame(tiny, make_engine):
    engine = make_engine()
    s = Session(style(tiny), seed=1)
    engine.add(s)
    frame = engine.step()[s.id].audio
    assert frame.shape == (FRAME_SAMPLES, CHANNELS) == (1920, 2)
    assert frame.dtype == np.int16
    audio = run(engine, 24)[s.id]
    assert audio.shape == (24 * 1920, 2)
    assert np.abs(audio.astype(np.int32)).max() > 0, "random weights still make sound"


def test_same_seed_same_audio_other_seed_other_audio(tiny, make_engine):
    a, b, c = (solo(tiny, make_engine, 12, seed=seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_session_audio_does_not_depend_on_batch_companions(tiny, make_engine):
    """Precisely: a session's frames alone (batch 1) and in row 2 of a batch of 4 with
    other seeds, styles and controls agree to within 2 int16 LSB on every sample for
    12 frames. Rows never mix; only XLA's batched matmul accumulation order differs,
    and the sampled tokens (argmax over Gumbel-perturbed logits) stay the same."""
    probe = dict(seed=5, controls=Controls(temperature=1.1, top_k=30))
    alone = solo(tiny, make_engine, 12, **probe)

    crowd = make_engine()
    others = [
        Session(style(tiny, "ambient"), seed=11, controls=Controls(temperature=0.5, top_k=3)),
        Session(style(tiny, "techno"), seed=12, notes=[60, 64]),
    ]
    for other in others:
        crowd.add(other)
    s2 = Session(style(tiny), **probe)
    crowd.add(s2)
    crowd.add(Session(None, seed=13, controls=Controls(top_k=1000)))
    assert crowd.capacity == 4 and crowd._slots.index(s2.id) == 2
    assert_same_stream(run(crowd, 12)[s2.id], alone)


def test_a_lone_session_can_run_in_a_two_row_step(tiny, make_engine):
    """On GPUs a batch-1 step is the slow path, so the engine keeps at least two rows
    there (`min_rows`). Forced here on CPU: bucket 1 is dropped, a lone session runs
    beside a throwaway row and streams what it streams alone."""
    alone = solo(tiny, make_engine, 8, seed=21)
    engine = make_engine(buckets=(1, 2, 4), rows_at_least=2)
    assert engine.buckets == (2, 4)
    s = Session(style(tiny), seed=21)
    engine.add(s)
    assert engine.capacity == 2
    assert_same_stream(run(engine, 8)[s.id], alone)
    engine.remove(s.id)
    assert engine.capacity == 0


def test_style_change_applies_to_the_very_next_frame(tiny, make_engine):
    engine = make_engine()
    a, b = Session(style(tiny), seed=3), Session(style(tiny), seed=3)
    engine.add(a)
    engine.add(b)
    before = run(engine, 6)
    np.testing.assert_array_equal(before[a.id], before[b.id])
    b.set_style(style(tiny, "baroque harpsichord"))
    next_frame = engine.step()
    assert not np.array_equal(next_frame[a.id].audio, next_frame[b.id].audio)
    assert b.frames_generated == a.frames_generated == 7


def test_style_ramp_glides_frame_by_frame(tiny):
    start, target = style(tiny, "ambient"), style(tiny, "techno")
    s = Session(start, seed=0)
    s.set_style(target, ramp_seconds=0.4)  # 10 frames at 25 fps
    seen = [s._ramp.next_frame().copy() for _ in range(12)]
    for i, emb in enumerate(seen[:10], start=1):
        np.testing.assert_allclose(emb, start + (target - start) * i / 10, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seen[10], target)
    np.testing.assert_array_equal(seen[11], target)


def test_new_target_mid_ramp_starts_from_where_the_glide_is(tiny):
    a, b, c = (style(tiny, t) for t in ("a", "b", "c"))
    s = Session(a)
    s.set_style(b, ramp_seconds=0.4)
    for _ in range(5):
        s._ramp.next_frame()
    midway = (a + b) / 2
    s.set_style(c, ramp_seconds=0.04)
    np.testing.assert_allclose(s._ramp._start, midway, atol=1e-5)
    np.testing.assert_array_equal(s._ramp.next_frame(), c)


def test_a_glide_of_no_length_is_refused_and_the_one_under_way_goes_on(tiny):
    """Lengths are checked here too (callers other than the API): 1e308 s overflowed the
    frame count, and a refused target must not replace the glide in progress."""
    a, b = style(tiny, "a"), style(tiny, "b")
    s = Session(a)
    s.set_style(b, ramp_seconds=0.4)
    s._ramp.next_frame()
    for bad in (1e308, 3600.04, -0.04, float("nan")):
        with pytest.raises(ValueError, match=r"^style_ramp_seconds: must be from 0 to 3600, got"):
            s.set_style(a, ramp_seconds=bad)
    np.testing.assert_allclose(s._ramp.next_frame(), a + (b - a) * 2 / 10, atol=1e-5)
    s.set_style(a, ramp_seconds=3600)  # an hour is allowed
    assert s.style_ramp().frames == 90000


def test_join_and_leave_between_steps_without_recompiling(tiny, make_engine):
    engine = make_engine(buckets=(1, 2, 4))
    engine.warmup()
    compiled = tiny.model.step._cache_size()
    sessions = [Session(style(tiny), seed=i) for i in range(4)]
    for s in sessions:
        engine.add(s)
        engine.step()
    assert engine.capacity == 4
    for s in sessions[:3]:
        engine.remove(s.id)
        engine.step()
    assert engine.capacity == 1 and list(engine.sessions) == [sessions[3].id]
    assert tiny.model.step._cache_size() == compiled


def test_leaving_compacts_rows_and_survivors_keep_their_stream(tiny, make_engine):
    """A survivor moved to another row by a shrink keeps streaming its own state."""
    expected = solo(tiny, make_engine, 8, seed=21)

    engine = make_engine()
    leaver, survivor = Session(style(tiny), seed=20), Session(style(tiny), seed=21)
    engine.add(leaver)
    engine.add(survivor)  # row 1
    first = run(engine, 4)[survivor.id]
    engine.remove(leaver.id)  # shrink to capacity 1: survivor moves to row 0
    assert engine.capacity == 1
    rest = run(engine, 4)[survivor.id]
    assert_same_stream(np.concatenate([first, rest]), expected)


def test_a_session_left_out_of_a_step_keeps_its_state(tiny, make_engine):
    """Paced sessions that are not due share the batch without advancing."""
    expected = solo(tiny, make_engine, 6, seed=31)

    engine = make_engine()
    busy, paused = Session(style(tiny), seed=30), Session(style(tiny), seed=31)
    engine.add(busy)
    engine.add(paused)
    first = [engine.step()[paused.id].audio for _ in range(3)]
    for _ in range(4):
        assert list(engine.step(only={busy.id})) == [busy.id]
    assert paused.frames_generated == 3 and busy.frames_generated == 7
    rest = [engine.step()[paused.id].audio for _ in range(3)]
    assert_same_stream(np.concatenate(first + rest), expected)


def test_snapshot_restore_moves_a_session_between_engines(tiny, make_engine):
    source = make_engine()
    s = Session(style(tiny), seed=9)
    source.add(s)
    run(source, 5)
    snap = source.snapshot(s.id)
    continued = run(source, 5)[s.id]
    source.remove(s.id)

    target = make_engine()
    target.add(Session(style(tiny, "other"), seed=1))
    target.restore(snap)
    assert_same_stream(run(target, 5)[s.id], continued)


def test_capacity_limit_is_a_clear_error(tiny, make_engine):
    engine = make_engine(buckets=(1, 2), max_sessions=2)
    engine.add(Session(None, seed=0))
    engine.add(Session(None, seed=1))
    with pytest.raises(CapacityError, match="limit of 2 concurrent sessions"):
        engine.add(Session(None, seed=2))
    assert len(engine.sessions) == 2
    assert len(engine.step()) == 2


def test_bad_controls_are_rejected_and_leave_the_session_unchanged(tiny):
    s = Session(style(tiny), seed=0)
    with pytest.raises(ValueError, match="topk"):
        s.update_controls(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        s.update_controls(temperature=-1.0, top_k=10)
    with pytest.raises(ValueError, match="cfg_musiccoca"):
        s.update_controls(cfg={"musiccoca": 9.0})
    with pytest.raises(ValueError, match="seed"):
        Session(None, seed=-1)
    assert s.controls == Controls()
    s.update_controls(top_k=10, cfg={"drums": 2.0})
    assert s.controls.top_k == 10 and s.controls.cfg["drums"] == 2.0
    assert s.controls.cfg["musiccoca"] == 3.0


@pytest.mark.parametrize("run_frames", [1, 64], ids=["frame-by-frame", "in-runs"])
def test_forcing_a_stream_with_its_own_codes_reproduces_it(tiny, make_engine, run_frames):
    """Teacher forcing puts exactly the state sampling would have: a session forced with
    another's first frames (same seed) then continues with that session's audio. In
    runs, 21 frames go in as 16 + 4 at once and the last one in the batched step."""
    forced_frames = 21
    engine = make_engine(prefill_run_frames=run_frames)
    a, b = Session(style(tiny), seed=12), Session(style(tiny), seed=12)
    engine.add(a)
    frames_a = [engine.step()[a.id] for _ in range(forced_frames + 4)]
    engine.add(b)
    b.prefill(np.stack([f.codes for f in frames_a[:forced_frames]]))
    forced = []
    while b.prefill_pending:
        forced.append(engine.step(only={b.id})[b.id])
    assert [f.n_frames for f in forced] == ([1] * 21 if run_frames == 1 else [16, 4, 1])
    assert all(f.forced and not f.audible for f in forced)
    assert not any(f.forced for f in frames_a)
    np.testing.assert_array_equal(np.concatenate([f.codes.reshape(-1, 12) for f in forced]),
                                  np.stack([f.codes for f in frames_a[:forced_frames]]))
    # the loop decoded through the codec
    assert_same_stream(np.concatenate([f.audio for f in forced]),
                       np.concatenate([f.audio for f in frames_a[:forced_frames]]))
    assert (b.frames_forced, b.frames_generated, b.prefill_pending) == (forced_frames, 0, 0)
    after = [engine.step(only={b.id})[b.id] for _ in range(4)]
    assert not any(f.forced for f in after)
    for got, want in zip(after, frames_a[forced_frames:], strict=True):
        np.testing.assert_array_equal(got.codes, want.codes)


def test_a_loop_put_in_mid_stream_hands_out_the_audio_still_owed_first(tiny, make_engine):
    """The decoder still owes the last sampled frame's audio when a loop goes in, so
    the first forced frame goes in alone (its step hands that audio out); the rest in
    runs, which hand out only the loop's own decode."""
    engine = make_engine()
    s = Session(style(tiny), seed=7)
    engine.add(s)
    for _ in range(3):
        engine.step()
    s.prefill(np.random.default_rng(2).integers(0, 1024, (21, 12)))
    steps = [engine.step()[s.id] for _ in range(4)]
    assert [(f.n_frames, f.forced, f.audible) for f in steps] == [
        (1, True, True), (16, True, False), (4, True, False), (1, False, False)]


def test_forced_runs_compile_nothing_after_warm_up(tiny, make_engine):
    engine = make_engine(buckets=(1, 2))
    assert engine.prefill_runs == (16, 4)  # tiny's context is 25 frames
    engine.warmup()
    compiled = (tiny.model.step, tiny.model.prefill, batch._put_row, batch._gather_rows)
    before = [f._cache_size() for f in compiled]
    looped, other = Session(style(tiny), seed=1), Session(style(tiny), seed=2)
    looped.prefill(np.zeros((25, 12), np.int32))
    engine.add(looped)
    engine.add(other)
    runs = [engine.step()[looped.id].n_frames for _ in range(4)]
    assert runs == [16, 4, 4, 1]
    assert [f._cache_size() for f in compiled] == before


def test_a_step_counts_the_frames_it_computed_even_for_a_session_that_left(tiny, make_engine):
    """The generator's frame counter (rows per step in bench_serve) counts at dispatch:
    a session stopped while its frame is computed still cost that frame."""
    engine = make_engine()
    looped, plain, leaver = (Session(style(tiny), seed=i) for i in range(3))
    looped.prefill(np.zeros((17, 12), np.int32))
    for s in (looped, plain, leaver):
        engine.add(s)
    pending = engine.dispatch()
    engine.remove(leaver.id)
    frames = engine.finish(pending.fetch())
    assert sorted(frames) == sorted([looped.id, plain.id])
    assert frames[looped.id].n_frames == 16
    assert pending.frames == 16 + 1 + 1


def test_prefill_changes_what_follows_and_is_deterministic(tiny, make_engine):
    loop = np.random.default_rng(0).integers(0, 1024, (20, 12))

    def continuation(prefill: bool) -> np.ndarray:
        engine = make_engine()
        s = Session(style(tiny), seed=5)
        if prefill:
            s.prefill(loop)
        engine.add(s)
        frames = []
        while sum(not f.forced for f in frames) < 10:
            frames.append(engine.step()[s.id])
        assert sum(f.n_frames for f in frames if f.forced) == 20 * prefill
        return np.concatenate([f.audio for f in frames if not f.forced])

    plain, looped, again = continuation(False), continuation(True), continuation(True)
    assert plain.shape == looped.shape == (10 * 1920, 2)
    assert not np.array_equal(plain, looped)
    np.testing.assert_array_equal(looped, again)


@pytest.mark.parametrize("run_frames", [1, 64], ids=["frame-by-frame", "in-runs"])
def test_each_frame_heard_is_its_own_codes_decoded(tiny, make_engine, run_frames):
    """The codec's decoder looks one frame ahead, so a step's audio belongs to the frame
    sampled one step earlier. What the listener hears lines up with the codes: from the
    very first frame (not 40 ms of silence), and right after a loop (not the loop's
    last frame once more, 40 ms behind the bar line), whether it went in frame by frame
    or in runs (here two of 4 frames)."""
    loop = np.random.default_rng(1).integers(0, 1024, (8, 12))
    engine = make_engine(prefill_run_frames=run_frames)
    fresh, looped = Session(style(tiny), seed=3), Session(style(tiny), seed=4)
    looped.prefill(loop)
    engine.add(fresh)
    engine.add(looped)
    steps = [engine.step() for _ in range(14)]
    assert fresh.decoder_delay == tiny.model.decoder_delay_frames == 1
    for session, forced in ((fresh, 0), (looped, len(loop))):
        frames = [step[session.id] for step in steps]
        assert sum(f.n_frames for f in frames if f.forced) == forced
        heard = np.stack([f.audio for f in frames if f.audible])
        assert len(heard) == sum(not f.forced for f in frames) - session.decoder_delay
        decoded = decode_at_once(tiny, np.concatenate([f.codes.reshape(-1, 12) for f in frames]))
        assert_heard_as_decoded(heard, decoded[forced:])


@pytest.mark.parametrize("name", ["mrt2_small", "mrt2_base"])
def test_the_real_codecs_hand_audio_out_one_frame_late_too(name):
    """Read from the codec's config (no weights needed): the real variants' decoder has
    the same one-frame lookahead as tiny's, so the frame accounting tested above is
    what they get."""
    assert get_variant(name).decoder_delay_frames == 1


def test_prefill_rejects_codes_of_the_wrong_shape_or_range(tiny):
    s = Session(style(tiny))
    with pytest.raises(ValueError, match=r"codes: expected \[frames, 12\]"):
        s.prefill(np.zeros((4, 8), np.int32))
    with pytest.raises(ValueError, match=r"codes: must be within 0\.\.1023"):
        s.prefill(np.full((4, 12), 1024))
