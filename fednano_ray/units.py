"""Human-readable units for tables (the CLI's run summary, ``fednano-ray report``)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.0 MiB``, ... (powers of 1024, up to TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
