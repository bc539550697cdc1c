"""The memory pre-flight's record of a step (MemoryEstimate: bytes by part and by phase) and how its
numbers print (format_bytes: B to TiB, so a tiny model's parts and a huge model's total both read).

memory.py fills a MemoryEstimate from the parts memory_parts.py counts; eval_memory.py does for an
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float) -> str:
    """`n` bytes in the largest binary unit that keeps the number at 1 or more (TiB at most), one
    decimal: 512 B, 3.0 KiB, 65.4 MiB, 59.8 GiB, 1.5 TiB. Negative values keep their sign."""
    value, unit = abs(float(n)), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    sign = "-" if n < 0 else ""
    return f"{sign}{int(value)} B" if unit == 0 else f"{sign}{value:.1f} {_UNITS[unit]}"


@dataclass
class MemoryEstimate:
    """Predicted bytes per component (`parts`), per phase (`phases`) and their maximum (`total`)."""

    parts: dict[str, int]
    phases: dict[str, int]
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # phase -> the parts it holds
    host: dict[str, int] = field(default_factory=dict)  # pinned CPU memory (activation offload)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def largest_parts(self, phase: str | None = None, count: int = 4) -> list[tuple[str, int]]:
        """The `count` largest parts held in `phase` (default: the peak one), largest first: what to
        shrink to lower that phase's peak."""
        names = self.members.get(phase or self.peak_phase, tuple(self.parts))
        held = [(name, self.parts[name]) for name in names if self.parts.get(name)]
        return sorted(held, key=lambda kv: -kv[1])[:count]

    def table(self) -> str:
        """The breakdown as aligned text: components, then phases (the peak one marked)."""
        lines = ["memory pre-flight (GiB)"]
        for name, v in self.parts.items():
            if v:
                lines.append(f"  {name:<28}{v / GiB:9.2f}")
        for name, v in self.host.items():
            lines.append(f"  {name + ' (host)':<28}{v / GiB:9.2f}")
        lines.append("  phases:")
        for name, v in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"    {name:<26}{v / GiB:9.2f}{mark}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "phases": self.phases, "host": self.host, "total": self.total}
