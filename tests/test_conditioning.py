"""The 144-token conditioning block: every control lands at its position and value."""

from __future__ import annotations

import numpy as np
import pytest
from magenta_rt.jax.model import MagentaRT2ModelBase

from serve_app.engine.conditioning import (
    BLOCK_SIZE,
    DRUMS,
    NoteTracker,
    build_block,
    cfg_tokens,
)
from serve_app.engine.session import Controls, Session

OFFSET = 7  # NUM_RESERVED_TOKENS + 1, as upstream's _build_conditioning


def test_layout_matches_the_models_input_configs():
    sizes = [c.rvq_truncation_level for c in MagentaRT2ModelBase().input_configs]
    assert sizes == [12, 128, 1, 2, 1] and sum(sizes) == BLOCK_SIZE == 144


def test_style_notes_drums_cfg_positions():
    style = np.arange(100, 112, dtype=np.int32)
    notes = np.zeros(128, np.int32)
    notes[60], notes[64] = 2, 1
    block = build_block(style, notes, DRUMS["on"], {"musiccoca": 3.0, "notes": 1.0, "drums": 2.0})
    np.testing.assert_array_equal(block[0:12], style + OFFSET)
    assert block[12 + 60] == 2 + OFFSET and block[12 + 64] == 1 + OFFSET
    assert block[12 + 61] == 0 + OFFSET
    assert block[140] == 1 + OFFSET
    # CFG scale s in [-1, 7] -> round((s + 1) / step): musiccoca/notes step 0.2, drums 1.0
    assert block[141] == 20 + OFFSET and block[142] == 10 + OFFSET and block[143] == 3 + OFFSET


def test_unconditioned_parts_are_masked():
    block = build_block(None, np.full(128, -1, np.int32), DRUMS["free"], Controls().cfg)
    assert (block[:141] == -1 + OFFSET).all()


def test_every_token_is_inside_its_channels_vocabulary():
    """The extremes of every control stay inside each channel's embedding rows.

    One upstream quirk is kept for parity: the CFG channels have no dropout token
    (47 ids for style/notes, 15 for drums) but are shifted by 7 like the others, so
    a scale of exactly 7.0 encodes one past the channel, into the first row of the
    next channel's slice of MultiChannelEmbedding's flat table (upstream's
    _build_conditioning does the same).
    """
    configs = MagentaRT2ModelBase().input_configs
    vocab = np.concatenate([[c.per_rvq_vocab_size] * c.rvq_truncation_level for c in configs])
    for style, drums, cfg in [
        (np.full(12, 1023), "on", {"musiccoca": 6.8, "notes": 6.8, "drums": 6.0}),
        (None, "free", {"musiccoca": -1.0, "notes": -1.0, "drums": -1.0}),
    ]:
        notes = np.full(128, 3, np.int32)
        block = build_block(style, notes, DRUMS[drums], cfg)
        assert (block >= 0).all() and (block < vocab).all()
    at_seven = build_block(None, np.zeros(128, np.int32), 0, Controls(cfg=dict.fromkeys(
        ("musiccoca", "notes", "drums"), 7.0)).cfg)
    assert at_seven[141] == vocab[141] == 47 and at_seven[143] == vocab[143] == 15


def test_cfg_binning_is_upstreams():
    assert cfg_tokens({"musiccoca": -1.0, "notes": 7.0, "drums": 0.0}) == (0, 40, 1)


def test_held_notes_onset_then_hold_then_release():
    tracker = NoteTracker()
    assert (tracker.next_frame() == -1).all()  # not conditioned
    tracker.set([60, 67])
    first, second = tracker.next_frame(), tracker.next_frame()
    assert first[60] == first[67] == 2 and second[60] == second[67] == 1
    tracker.set([60, 72])
    third = tracker.next_frame()
    assert third[60] == 1 and third[72] == 2 and third[67] == 0
    tracker.set([])
    assert (tracker.next_frame() == 0).all()
    with pytest.raises(ValueError, match=r"notes: MIDI pitches must be 0\.\.127"):
        tracker.set([128])


def test_session_frames_carry_notes_drums_and_sampling_controls(tiny):
    session = Session(
        tiny.style.embed_text("funk"),
        controls=Controls(temperature=0.9, top_k=17, drums="off", cfg={"notes": 2.0}),
        notes=[48],
    )
    inputs = session.next_frame_inputs(tiny.style)
    block, (temperature, top_k) = inputs.block, inputs.sampling
    assert inputs.forced is None
    assert block[12 + 48] == 2 + OFFSET and block[140] == 0 + OFFSET
    assert block[142] == 15 + OFFSET
    assert (temperature, top_k) == (0.9, 17)
    np.testing.assert_array_equal(
        block[:12], tiny.style.tokenize(tiny.style.embed_text("funk")) + OFFSET
    )
    block = session.next_frame_inputs(tiny.style).block
    assert block[12 + 48] == 1 + OFFSET
