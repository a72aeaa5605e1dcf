"""What a compiled XLA program does, read from its optimized HLO text: the collectives (count, bytes, group size)
and the largest arrays. Pure text parsing, so it works for executables compiled for devices this machine does
not have (TPU topologies, `fa_jax.aot`).

Counts are static: an op inside a loop body (a `while`, e.g. a scan over loss chunks or micro-batches) is counted
once, however many times the loop runs.
"""
from __future__ import annotations

import math
import re

# The collectives reported, by their HLO opcode (the async "-start" forms count as the op; "-done" is not counted).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# "%name = SHAPE opcode(" where SHAPE is an array or a tuple of arrays
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                    r"([a-z][a-z0-9\-]*)\(")


def array_bytes(dtype: str, dims: str) -> int:
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    return int(n * _DTYPE_BYTES.get(dtype, 4))


def shape_arrays(shape: str) -> list[tuple[str, int]]:
    """[(text like 'bf16[8,128]', bytes)] of every array in an HLO shape (an array or a tuple of arrays)."""
    return [(f"{t}[{d}]", array_bytes(t, d)) for t, d in _ARRAY.findall(shape) if t in _DTYPE_BYTES]


def group_size(line: str) -> int | None:
    """Participants per group of a collective, from its replica_groups (explicit, iota or mesh form), or
    source_target_pairs for collective-permute (None: not stated)."""
    m = re.search(r"replica_groups=\{(\{[^}]*\})", line)
    if m:
        first = m.group(1).strip("{}")
        return len([x for x in first.split(",") if x.strip()]) or None
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in (p.split("=") for p in m.group(1).split(",") if "=" in p)}
        axes = [a.strip("'\" ") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes)
    return None


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def _collective_bytes(kind: str, opcode: str, shape: str) -> int:
    """Bytes of the collective's result per device: the gathered / reduced / exchanged arrays. The async start
    form of all-gather and collective-permute returns (operands, results[, scratch]): its results are counted."""
    arrays = shape_arrays(shape)
    if not arrays:
        return 0
    if opcode.endswith("-start") and kind in ("all-gather", "collective-permute") and shape.startswith("("):
        # ((operands...), (results...)) or (operand, result, ...): take the second half / second array
        inner = shape[1:-1]
        depth, parts, cur = 0, [], ""
        for ch in inner:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        if len(parts) >= 2:
            return sum(b for _, b in shape_arrays(parts[1]))
    return sum(b for _, b in arrays)


def traffic_bytes(kind: str, nbytes: int, n: int | None) -> float:
    """Bytes each device sends for one collective on a ring of n devices (bandwidth-optimal algorithms):
    all-gather and all-to-all (n-1)/n of the result, reduce-scatter (n-1) x its (scattered) result, all-reduce
    2 (n-1)/n of the array, collective-permute the whole array."""
    n = n or 2
    if n <= 1:
        return 0.0
    f = (n - 1) / n
    return {"all-gather": f * nbytes, "all-to-all": f * nbytes, "reduce-scatter": (n - 1) * nbytes,
            "all-reduce": 2 * f * nbytes, "collective-permute": float(nbytes)}[kind]


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes", "traffic_bytes"}} for every kind of COLLECTIVES (zeros where absent).

    bytes: the sum of the collectives' result sizes per device; traffic_bytes: what each device sends for them
    (`traffic_bytes`), the input of the roofline's communication time.
    """
    out = {k: {"count": 0, "bytes": 0, "traffic_bytes": 0.0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        kind = _collective_kind(m.group(3))
        if kind is None:
            continue
        nbytes = _collective_bytes(kind, m.group(3), m.group(2))
        rec = out[kind]
        rec["count"] += 1
        rec["bytes"] += nbytes
        rec["traffic_bytes"] += traffic_bytes(kind, nbytes, group_size(line))
    return out


def largest_arrays(hlo_text: str, top: int = 5) -> list[dict]:
    """The `top` largest results of the program's instructions (parameters excluded): [{"name", "shape",
    "bytes"}], largest first, one per shape. XLA's memory analysis gives only totals; this names what the temporaries are made of."""
    seen = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(3) in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
            continue
        for text, nbytes in shape_arrays(m.group(2)):
            seen.append((nbytes, m.group(1), text, m.group(3)))
    seen.sort(key=lambda r: -r[0])
    out, names = [], set()
    for nbytes, name, text, op in seen:
        if text in names:  # one entry per shape: copies, async start/done pairs and loop carries repeat it
            continue
        names.add(text)
        out.append({"name": name, "op": op, "shape": text, "bytes": nbytes})
        if len(out) == top:
            break
    return out
