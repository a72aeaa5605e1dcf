"""Device memory: how much a program may use per device (`memory_budget`), how much a compiled program needs
(`memory_of`, from XLA's memory analysis), and sizes as text ("12GiB" in, "11.18 GiB" out).

Used by the training loop (`model.remat=auto` keeps the first remat policy whose compiled step fits), by the config
checks (`run.memory_budget`) and by ahead-of-time compilation (`fa_jax.aot`).
"""
from __future__ import annotations

import re

import jax

from fa_jax.errors import FaJaxError

GiB = 1024 ** 3
# Share of a chip's HBM that a program may use: the runtime, its allocator's fragmentation and the host transfers
# of the input pipeline need the rest.
USABLE_FRACTION = 0.95


def memory_of(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis, with total_bytes = arguments + outputs - aliased (donated
    inputs reused as outputs) + temporaries + generated code."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                          + out["generated_code_bytes"])
    return out


def memory_budget(cfg, topology=None, device=None) -> float:
    """Bytes a program may use per device: `run.memory_budget` if set (bytes, or a string such as "12GiB"),
    else USABLE_FRACTION of the topology's chip HBM (`topology`: an `aot.Topology`), of the device's own memory
    limit, or (CPU) of the memory available on the host divided among its local devices."""
    given = (cfg.get("run") or {}).get("memory_budget") if cfg is not None else None
    if given not in (None, ""):
        return parse_bytes(given, "run.memory_budget")
    if topology is not None:
        return USABLE_FRACTION * topology.chip.hbm_bytes
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices and some plugins have none
        stats = None
    if stats and stats.get("bytes_limit"):
        return USABLE_FRACTION * float(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        return USABLE_FRACTION * info["MemAvailable"] / max(1, len(jax.local_devices()))
    except (OSError, KeyError, ValueError):
        return float("inf")


def parse_bytes(value, what: str) -> float:
    """12e9, "12GiB", "16GB", "512MiB" -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b?|b)?\s*", str(value).lower())
    if not m:
        raise FaJaxError(f"{what}={value!r}: expected bytes, e.g. 12e9, \"12GiB\" or \"16GB\"")
    num, unit = float(m.group(1)), (m.group(2) or "b")
    scale = {"b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2, "gi": GiB, "gib": GiB, "ti": 1024 ** 4,
             "tib": 1024 ** 4}[unit]
    if num <= 0:
        raise FaJaxError(f"{what}={value!r}: expected a positive size")
    return num * scale


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
