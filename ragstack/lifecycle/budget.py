"""The engines' memory budget: a capacity, a safety buffer, and the high-watermark they leave.

A load may proceed only while the engines' committed memory stays at or under the high-watermark
(``total * (1 - safety_buffer)``); the buffer (0.15 by default; 15-20 % is the
intended range, docs/design-notes.md#memory) is the room left for activations, KV cache
growth and fragmentation that a per-model footprint measured after load does not show.
"""
from __future__ import annotations

import dataclasses

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    total_bytes: int
    safety_buffer: float = 0.15

    def __post_init__(self):
        if self.total_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {self.total_bytes}")
        if not 0.0 <= self.safety_buffer < 1.0:
            raise ValueError(f"safety buffer must be in [0, 1), got {self.safety_buffer}")

    @property
    def watermark_bytes(self) -> int:
        """The high-watermark: the most the engines may hold together."""
        return int(self.total_bytes * (1.0 - self.safety_buffer))

    def headroom(self, used_bytes: int) -> int:
        """What is left under the watermark (negative when over it)."""
        return self.watermark_bytes - used_bytes

    def fits(self, used_bytes: int, extra_bytes: int) -> bool:
        return used_bytes + extra_bytes <= self.watermark_bytes

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "safety_buffer": self.safety_buffer,
                "watermark_bytes": self.watermark_bytes}


def parse_bytes(text) -> int:
    """'1.5G', '512M', '2048K', '123' (bytes) -> int bytes (binary units)."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(float(s))
