"""Text and audio prompts -> 768-d MusicCoCa style embeddings, and embeddings -> tokens.

Real variants use MusicCoCa (TFLite models under the repo's `resources/musiccoca/`);
`tiny` uses upstream's `MockMusicCoCa`, deterministic by hash, so tests need no
download. Embeddings of repeated text prompts are cached: a jam re-sends its styles
with every update.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pathlib
import threading

import numpy as np
import soxr
from magenta_rt import audio as mrt_audio
from magenta_rt import musiccoca

log = logging.getLogger(__name__)


def mono_at(samples: np.ndarray, sample_rate: int, rate: int) -> np.ndarray:
    """A clip as MusicCoCa takes it: channels averaged, at `rate` (soxr VHQ), [n, 1]."""
    mono = np.asarray(samples, np.float32)
    if mono.ndim == 2:
        mono = mono.mean(axis=1)
    if sample_rate != rate:
        mono = soxr.resample(mono, sample_rate, rate, "VHQ")
    return mono[:, None]


class StyleModel:
    """Embeds prompts and tokenizes embeddings; thread-safe (TFLite interpreters are not)."""

    def __init__(self, backend: musiccoca.MusicCoCaBase, *, cache_size: int = 1024) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._embed_text_cached = functools.lru_cache(maxsize=cache_size)(self._embed_text)

    @classmethod
    def mock(cls) -> StyleModel:
        return cls(musiccoca.MockMusicCoCa())

    @classmethod
    def from_resources(cls, resource_dir: pathlib.Path) -> StyleModel:
        return cls(musiccoca.MusicCoCa(resource_dir=resource_dir, lazy=True))

    @property
    def is_mock(self) -> bool:
        return isinstance(self._backend, musiccoca.MockMusicCoCa)

    @contextlib.contextmanager
    def _exclusive(self):
        """One caller at a time; MockMusicCoCa reseeds NumPy's global RNG, so restore it."""
        with self._lock:
            rng_state = np.random.get_state()
            try:
                yield
            finally:
                np.random.set_state(rng_state)

    def _embed_text(self, text: str) -> np.ndarray:
        with self._exclusive():
            emb = np.asarray(self._backend.embed(text), np.float32)
        emb.setflags(write=False)
        return emb

    def embed_text(self, text: str) -> np.ndarray:
        return self._embed_text_cached(text)

    def embed_audio(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Embeds a clip ([n] or [n, channels] float in [-1, 1]) pooled over time.

        The clip reaches upstream already mono and at the model's rate, as upstream would
        make it (channels averaged, then resampled), but resampled with soxr: upstream's
        resampy (kaiser_best) took 164 ms of a 16 s loop's 178 ms on the 2-core dev box,
        and every jam on a loop, `loop_weight` render and current-mix style waits for it."""
        rate = self._backend.config.sample_rate
        waveform = mrt_audio.Waveform(mono_at(samples, sample_rate, rate), rate)
        with self._exclusive():
            return np.asarray(self._backend.embed(waveform), np.float32)

    def tokenize(self, embedding: np.ndarray) -> np.ndarray:
        with self._exclusive():
            tokens = self._backend.tokenize(np.asarray(embedding, np.float32))
        return np.asarray(tokens, np.int32)

    def cache_info(self):
        return self._embed_text_cached.cache_info()
