"""Clip frame indices against reference spec §5.2 (V-JEPA V1 `loadvideo_decord`)."""

import numpy as np
import pytest

from engine.data.sampling import clip_frame_indices, frame_step_for

F, STEP = 16, 4  # V1 pretraining: 16 frames, sampling rate 4, so a clip spans 64 frames
# floor(linspace(0, 64, 16)) with the last point clipped to 63: stride 64/15 ~ 4.27, not 4.
FIRST_SPAN = [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_long_video_first_span_without_random_sampling():
    (indices,) = clip_frame_indices(300, F, STEP, 1, rng(), random_clip_sampling=False)
    assert indices.dtype == np.int64
    assert indices.tolist() == FIRST_SPAN


@pytest.mark.parametrize("num_frames", [65, 100, 300])
def test_long_video_random_span(num_frames):
    starts = set()
    for seed in range(200):
        (indices,) = clip_frame_indices(num_frames, F, STEP, 1, rng(seed))
        start = int(indices[0])
        assert len(indices) == F
        # end = randint(64, P) exclusive, start = end - 64, so start in [0, P - 65] and the clip ends at end - 1.
        assert 0 <= start <= num_frames - 65
        assert indices[-1] - start == F * STEP - 1
        assert (indices - start).tolist() == FIRST_SPAN
        starts.add(start)
    # A 65-frame video has a single possible span; longer ones get spread-out starts.
    assert starts == {0} if num_frames == 65 else len(starts) > min(num_frames - 64, 200) // 2


def test_short_video_pads_with_last_frame():
    # P = 30 <= 64: 30 // 4 = 7 points of linspace(0, 30), the last one clipped to 29, then 29 repeated.
    generator = rng()
    state = generator.bit_generator.state
    (indices,) = clip_frame_indices(30, F, STEP, 1, generator)
    assert indices.tolist() == [0, 5, 10, 15, 20, 25, 29] + [29] * 9
    assert generator.bit_generator.state == state  # no random draw for short videos


def test_partition_exactly_clip_length_is_short():
    # P == clip_len takes the short branch: 16 points of linspace(0, 64) clipped to 63, i.e. the first span.
    (indices,) = clip_frame_indices(64, F, STEP, 1, rng())
    assert indices.tolist() == FIRST_SPAN


def test_several_clips_are_offset_by_partition():
    clips = clip_frame_indices(400, F, STEP, 2, rng(), random_clip_sampling=False)
    assert [c.tolist() for c in clips] == [FIRST_SPAN, [i + 200 for i in FIRST_SPAN]]

    for seed in range(50):
        for i, indices in enumerate(clip_frame_indices(401, F, STEP, 2, rng(seed))):
            assert i * 200 <= indices[0] and indices[-1] < (i + 1) * 200
            assert indices[-1] - indices[0] == F * STEP - 1

    short = clip_frame_indices(60, F, STEP, 2, rng())
    assert short[0].tolist() == [0, 5, 10, 15, 20, 25, 29] + [29] * 9
    assert (short[1] - short[0]).tolist() == [30] * F


def test_overlap_mode_short_video_repeats_the_same_clip():
    # len 30 <= 64: S = 29, 29 // 4 = 7 points of linspace(0, 29) clipped to [0, 28], padded; clip_step 0.
    clips = clip_frame_indices(30, F, STEP, 3, rng(), allow_clip_overlap=True)
    expected = [0, 4, 9, 14, 19, 24, 28] + [28] * 9
    assert [c.tolist() for c in clips] == [expected] * 3


def test_overlap_mode_clips_offset_by_clip_step():
    # len 100, 3 clips: P = 33 <= 64; S = 63 -> 15 points of linspace(0, 63) clipped to 62, padded with 62;
    # clip_step = (100 - 64) // 2 = 18.
    clips = clip_frame_indices(100, F, STEP, 3, rng(), allow_clip_overlap=True)
    base = [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49, 54, 58, 62, 62]
    assert [c.tolist() for c in clips] == [[i + 18 * k for i in base] for k in range(3)]


def test_determinism_by_rng_seed():
    def draw(seed):
        return [c.tolist() for c in clip_frame_indices(1000, F, STEP, 3, rng(seed))]

    assert draw(7) == draw(7)
    assert len({str(draw(seed)) for seed in range(10)}) > 1


def test_rejects_video_shorter_than_num_clips():
    with pytest.raises(ValueError, match="cannot be split"):
        clip_frame_indices(2, F, STEP, 3, rng())


# ------------------------------------------------------------------------------------ frame step: duration and fps


@pytest.mark.parametrize("video_fps, options, expected", [
    (30.0, {"frame_step": 4}, 4),                    # fixed step: the video's rate does not matter
    (30.0, {"clip_duration": 2.0}, 3),               # V1: int(2 s * 30 fps / 16) = int(3.75)
    (25.0, {"clip_duration": 2.0}, 3),               # int(3.125)
    (60.0, {"clip_duration": 1.0}, 3),               # int(3.75)
    (29.97, {"fps": 10}, 3),                         # V2: ceil(29.97) // 10
    (25.0, {"fps": 8}, 3),                           # 25 // 8
    (24.0, {"fps": 30}, 1),                          # the reference's 0, clamped (documented deviation)
    (30.0, {"clip_duration": 0.1}, 1),               # int(0.1875) = 0, clamped
])
def test_frame_step_modes(video_fps, options, expected):
    assert frame_step_for(video_fps, F, **options) == expected


def test_frame_step_mode_errors():
    with pytest.raises(ValueError, match="exactly one"):
        frame_step_for(30.0, F, frame_step=4, fps=10)
    with pytest.raises(ValueError, match="exactly one"):
        frame_step_for(30.0, F)
    with pytest.raises(ValueError, match="frame rate is unknown"):
        frame_step_for(0.0, F, clip_duration=2.0)


def test_duration_mode_clip_spans_the_duration():
    # 2 s clips of a 30 fps video: step 3, so a clip spans 48 frames = 1.6 s (the reference's int() truncation).
    step = frame_step_for(30.0, F, clip_duration=2.0)
    (indices,) = clip_frame_indices(300, F, step, 1, rng(), random_clip_sampling=False)
    assert indices[0] == 0 and indices[-1] == F * step - 1
