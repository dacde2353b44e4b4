"""streaming: frame sources (files, URLs, live pushes), sampling, timestamps, sessions, engine."""

from streaming.video import (
    Frame,
    SamplingPlan,
    SamplingPlanError,
    Video,
    VideoDecodeError,
    VideoMeta,
    open_video,
    plan_frame_indices,
)

__all__ = [
    "Frame",
    "SamplingPlan",
    "SamplingPlanError",
    "Video",
    "VideoDecodeError",
    "VideoMeta",
    "open_video",
    "plan_frame_indices",
]
