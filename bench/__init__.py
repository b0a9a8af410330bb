"""Benchmarks (not tests): the project's pipeline against the course notebook's, on the real data."""

from pathlib import Path

PLAIN = Path(__file__).resolve().parent.parent / "sweeps" / "plain.yaml"  # the mission's head-only sweep
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the flags that decide the fast paths


def cpu_flags() -> str:
    """This CPU's flags among CPU_FLAGS, as docs/benchmarks.md's tables name them."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return " ".join(sorted(set(flags) & set(CPU_FLAGS))) or "unknown"
