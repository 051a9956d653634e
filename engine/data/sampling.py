"""Which frames of a video make up each clip (reference spec §5.2, `loadvideo_decord` in V-JEPA V1).

The video is split into `num_clips` equal partitions of `P = num_frames // num_clips` frames and one clip of
`frames_per_clip` (F) indices is taken from each. A clip spans `clip_len = F * frame_step` frames, but its F indices
are a linspace over that span, so the effective stride is `clip_len / (F - 1)` (0, 4, 8, 12, 17, ... for F=16, step
4), exactly as the reference does it.
"""

import math

import numpy as np


def clip_frame_indices(num_frames_in_video: int, frames_per_clip: int, frame_step: int, num_clips: int,
                       rng: np.random.Generator, *, random_clip_sampling: bool = True,
                       allow_clip_overlap: bool = False) -> list[np.ndarray]:
    """Frame indices of each clip, one int64 array of length `frames_per_clip` per clip.

    Args:
        num_frames_in_video: number of decodable frames in the video.
        frames_per_clip: F, frames per returned clip.
        frame_step: nominal stride between sampled frames; a clip spans `F * frame_step` frames.
        num_clips: number of clips, one per equal partition of the video.
        rng: source of the random clip end (only drawn from for partitions longer than the clip span).
        random_clip_sampling: draw the clip end uniformly; if False, take the first span of each partition.
        allow_clip_overlap: evaluation mode for short videos: every clip samples the first
            `min(clip_len, num_frames)` frames, offset by a common step, instead of padding within its partition.

    Short partitions (P <= clip span) are sampled at ~`frame_step` and padded by repeating their last frame.
    """
    if min(frames_per_clip, frame_step, num_clips) < 1:
        raise ValueError(f"frames_per_clip, frame_step and num_clips must be >= 1, got "
                         f"{frames_per_clip}, {frame_step}, {num_clips}")
    partition_len = num_frames_in_video // num_clips
    if partition_len < 1:
        raise ValueError(f"a video of {num_frames_in_video} frames cannot be split into {num_clips} clips")
    clip_len = frames_per_clip * frame_step

    clips = []
    for i in range(num_clips):
        if partition_len > clip_len:
            # numpy's upper bound is exclusive, as in the reference's np.random.randint(clip_len, P).
            end = int(rng.integers(clip_len, partition_len)) if random_clip_sampling else clip_len
            start = end - clip_len
            indices = np.clip(np.linspace(start, end, num=frames_per_clip), start, end - 1).astype(np.int64)
            indices += i * partition_len
        elif not allow_clip_overlap:
            indices = _sample_then_pad(partition_len, frames_per_clip, frame_step) + i * partition_len
        else:
            sample_len = min(clip_len, num_frames_in_video) - 1
            indices = _sample_then_pad(sample_len, frames_per_clip, frame_step)
            # num_clips > 1 whenever this mode is reached with a video longer than clip_len (else P > clip_len).
            clip_step = (num_frames_in_video - clip_len) // (num_clips - 1) if num_frames_in_video > clip_len else 0
            indices += i * clip_step
        clips.append(indices)
    return clips


def _sample_then_pad(length: int, frames_per_clip: int, frame_step: int) -> np.ndarray:
    """`length // frame_step` points of linspace(0, length), padded with `length` to F entries, clipped to
    [0, length - 1]. The reference's short-video rule; `length` itself is never a valid index, so the padding
    lands on the last frame."""
    num_sampled = length // frame_step
    indices = np.concatenate([np.linspace(0, length, num=num_sampled), np.full(frames_per_clip - num_sampled, length)])
    # For length == 0 (a 1-frame video in overlap mode) the reference clips to -1; 0 is the only real frame.
    return np.clip(indices, 0, max(length - 1, 0)).astype(np.int64)


def frame_step_for(video_fps: float, frames_per_clip: int, *, frame_step: int | None = None,
                   clip_duration: float | None = None, fps: int | None = None) -> int:
    """The frame step of one video: exactly one of `frame_step` (fixed), `clip_duration` (seconds per clip: V1's
    `int(duration * fps / F)`) or `fps` (V2's target rate: `ceil(video fps) // fps`) must be given.

    Deviation: where the reference's formula gives 0 (a clip shorter than F frames of the video, or a target rate
    above the video's), it samples nothing; here the step is 1, so such videos give consecutive frames.
    """
    if sum(x is not None for x in (frame_step, clip_duration, fps)) != 1:
        raise ValueError("give exactly one of frame_step, clip_duration and fps")
    if frame_step is not None:
        return frame_step
    if video_fps <= 0:
        raise ValueError("the video's frame rate is unknown, so clip_duration / fps cannot set its frame step")
    if clip_duration is not None:
        step = int(clip_duration * video_fps / frames_per_clip)
    else:
        step = math.ceil(video_fps) // fps
    return max(step, 1)
