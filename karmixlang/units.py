"""Sizes as people write and read them: "5GB" in a recipe or a flag, "1.2 GB" in a plan."""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(s: str) -> int:
    """Bytes in "5GB", "1.5 GiB", "500MB" or "1000000" (KB..TB decimal, KiB..TiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", s)
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise ValueError(f"invalid size {s!r}: write a number with an optional unit, like "
                         "5GB or 500MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    n = int(Fraction(m.group(1)) * unit)
    if n <= 0:
        raise ValueError(f"invalid size {s!r}: must be at least one byte")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
