"""The model's frame geometry, shared by every layer (a leaf module: imports nothing)."""

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_SAMPLES = 1920  # one 40 ms frame per channel
FRAMES_PER_SECOND = SAMPLE_RATE // FRAME_SAMPLES  # 25
STYLE_EMBEDDING_DIM = 768  # MusicCoCa
