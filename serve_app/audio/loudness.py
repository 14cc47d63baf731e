"""Loudness matching: generated bars brought to the loudness of the loop they continue.

`lufs` uses an ITU-R BS.1770 meter (pyloudnorm); `rms` matches plain RMS (for clips
too short to gate); `auto` picks LUFS when the loop and every bar are long enough to
measure, RMS otherwise; `none` leaves audio alone. Each bar gets its own gain, ramped
over a few milliseconds at bar joins so a gain change never clicks, and capped so the
peak stays `headroom_db` below full scale.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyloudnorm

from ..frames import SAMPLE_RATE

MODES = ("auto", "lufs", "rms", "none")
MIN_LUFS_SECONDS = 0.4  # one BS.1770 gating block
FLOOR_DB = -70.0  # quieter than this is treated as silence (no gain applied)
RAMP_SECONDS = 0.005


def rms_db(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20 * np.log10(max(rms, 1e-12))


def lufs(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    return float(pyloudnorm.Meter(rate).integrated_loudness(audio.astype(np.float64)))


def _measure(audio: np.ndarray, mode: str, rate: int) -> float:
    return lufs(audio, rate) if mode == "lufs" else rms_db(audio)


@dataclasses.dataclass
class LoudnessMatcher:
    """Matches audio (float [n, 2] in [-1, 1] at `rate`, measured after any resampling:
    a lower rate drops energy) to a reference loop's loudness (at 48 kHz)."""

    reference: np.ndarray
    mode: str = "auto"
    headroom_db: float = 1.0
    rate: int = SAMPLE_RATE
    reference_rate: int = SAMPLE_RATE
    _reference_db: dict[str, float] = dataclasses.field(default_factory=dict, init=False,
                                                        repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"loudness_mode: must be one of {list(MODES)}, got {self.mode!r}")
        if not 0 <= self.headroom_db <= 24:
            raise ValueError(f"loudness_headroom_db: must be within 0..24, got {self.headroom_db}")

    def _mode_for(self, shortest_seconds: float) -> str:
        if self.mode != "auto":
            return self.mode
        long_enough = min(shortest_seconds, self.reference.shape[0] / self.reference_rate)
        return "lufs" if long_enough >= MIN_LUFS_SECONDS else "rms"

    def reference_db(self, mode: str) -> float:
        """The loop's loudness, measured once per mode: a jam matches every chunk to it,
        and a long loop costs more to measure than a chunk (BS.1770 over 30 s took
        47 ms on the 2-core dev box, a 2 s bar 4 ms), on the generator's step loop."""
        if mode not in self._reference_db:
            self._reference_db[mode] = _measure(self.reference, mode, self.reference_rate)
        return self._reference_db[mode]

    def prepare(self, bar_seconds: float) -> None:
        """Measures the loop for bars this long now, so that the first chunk does not."""
        if self.mode != "none":
            self.reference_db(self._mode_for(bar_seconds))

    def apply(self, audio: np.ndarray, bar_starts: list[int], *,
              start_gain_db: float | None = None) -> tuple[np.ndarray, dict]:
        """Per-bar gains; `bar_starts` are the sample offsets where bars begin (first 0).
        `start_gain_db`: the gain the previous chunk ended with, ramped from at sample 0."""
        if self.mode == "none":
            return audio, {"mode": "none"}
        edges = [*bar_starts, audio.shape[0]]
        shortest = min(b - a for a, b in itertools.pairwise(edges)) / self.rate
        mode = self._mode_for(shortest)
        target = self.reference_db(mode)
        ceiling = 10 ** (-self.headroom_db / 20)
        gains_db = []
        for a, b in itertools.pairwise(edges):
            bar = audio[a:b]
            level = _measure(bar, mode, self.rate)
            gain = 0.0 if not np.isfinite(level) or level < FLOOR_DB else target - level
            peak = float(np.abs(bar).max(initial=0.0))
            if peak > 0:
                gain = min(gain, 20 * np.log10(ceiling / peak))
            gains_db.append(gain)
        # Bars measured one by one do not add up exactly to the whole (BS.1770 gates
        # relative to the programme), so one common trim brings the whole onto target.
        trial = audio * self._gain_curve(edges, gains_db, None)[:, None]
        whole = _measure(trial, mode, self.rate)
        if np.isfinite(whole) and whole >= FLOOR_DB:
            peak = float(np.abs(trial).max(initial=0.0))
            trim = target - whole
            if peak > 0:
                trim = min(trim, 20 * np.log10(ceiling / peak))
            gains_db = [g + trim for g in gains_db]
        out = audio * self._gain_curve(edges, gains_db, start_gain_db)[:, None]
        report = {"mode": mode, "target_db": round(target, 2),
                  "bar_gains_db": [round(g, 2) for g in gains_db],
                  "headroom_db": self.headroom_db}
        return np.clip(out, -ceiling, ceiling).astype(np.float32), report

    def _gain_curve(self, edges: list[int], gains_db: list[float],
                    start_gain_db: float | None) -> np.ndarray:
        """Linear gains per sample, stepping at bar joins through a short linear ramp."""
        gains = [10 ** (g / 20) for g in gains_db]
        before = [None if start_gain_db is None else 10 ** (start_gain_db / 20), *gains]
        curve = np.empty(edges[-1], np.float32)
        ramp = max(1, int(RAMP_SECONDS * self.rate))
        for i, (a, b) in enumerate(itertools.pairwise(edges)):
            curve[a:b] = gains[i]
            if before[i] is not None:
                n = min(ramp, b - a)
                curve[a:a + n] = np.linspace(before[i], gains[i], n, endpoint=False)
        return curve


def fade_edges(audio: np.ndarray, seconds: float = RAMP_SECONDS, *, start: bool = True,
               end: bool = True, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Short linear fades so a render does not start or stop with a click."""
    n = min(int(seconds * rate), audio.shape[0] // 2)
    out = audio.copy()
    if n:
        ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)[:, None]
        if start:
            out[:n] *= ramp
        if end:
            out[-n:] *= ramp[::-1]
    return out
