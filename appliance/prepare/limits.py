"""The [limits] section: what one input may cost to decode (size, pixels, frames, a worker's memory and time)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from appliance.domain.settings import Section


class LimitsConfig(Section):
    max_file_mb: float = Field(2048, gt=0, description="Larger files are rejected unread.")
    max_pixels: int = Field(80_000_000, gt=0, description="Per frame; larger images are rejected before decoding.")
    max_frames: int = Field(512, gt=0, description="Multi-frame inputs with more frames are rejected.")
    multiframe: Literal["per_frame", "reject"] = Field(
        "per_frame", description="Score each frame of a multi-frame input, or reject such inputs."
    )
    worker_memory_mb: int = Field(
        3072,
        ge=0,
        description="Data memory (RLIMIT_DATA) each decode worker process may use; a file that needs more is "
        "rejected as decode_out_of_memory. 0: no cap. Not applied with decode_with = 'threads'.",
    )
    decode_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Decoding and preprocessing one file may take this long before it is rejected as "
        "decode_timeout. 0: no limit. Not applied with decode_with = 'threads'.",
    )
