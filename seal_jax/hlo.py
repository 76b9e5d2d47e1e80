"""What a compiled program does, read from its optimised HLO text: FLOPs, bytes, collectives, loops.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, whatever its trip count (a scanned
36-layer model reports about one layer), and a deviceless GPU compile gives no cost analysis at all. This
module reads the optimised HLO (``compiled.as_text()``) of any backend and counts the whole program:

* **trip counts** come from the loop's ``known_trip_count`` backend config (the GPU compiler writes it) or,
  failing that, from its condition: ``counter < N`` on a tuple element whose initial value is a constant
  (how ``lax.scan`` / ``fori_loop`` lower). A loop whose end depends on data (the decode loop stops when
  every row has stopped) has no static trip count: it is counted ``unknown_trips`` times (default 1) and
  listed in :attr:`HloStats.loops` with ``trips=None``, so a caller can report per-iteration figures.
* **FLOPs** are matrix FLOPs: ``2 × output elements × contracted size`` of every ``dot`` and
  ``convolution`` (TPU lowers dots to convolutions), inside fusions too, and of a sum that a compiler made
  of a dot (a ``reduce`` with an add of a ``multiply`` whose metadata names a ``dot_general``: libtpu,
  and the GPU compiler, lower a one-row matmul, a decode step of one row per chip, to a multiply and a
  reduce). Element-wise work is not counted:
  for a language model it is a fraction of a percent of the matmuls, and the matrix units set the peak.
  Custom calls count 0 and are listed in :attr:`HloStats.custom_calls`, except the fused attention kernels
  seal-jax calls (:data:`ATTENTION_KERNELS`: JAX's Pallas splash attention on TPU, its Triton flash
  attention on GPU), whose matmuls are counted from their operands' shapes, causal (the tiles on or below
  the diagonal: ``attention.causal_share``).
* **bytes** are what each top-level operation (a fusion, a copy, a collective, a custom call …) reads and
  writes: its operands plus its result, as XLA's own cost model counts them, with two refinements that
  matter in loops over stacked weights and caches: an operand that a fusion only reads through
  ``dynamic-slice``/``slice`` counts the slices' bytes (through a ``gather``, the rows it gathers: an
  embedding lookup reads the looked-up rows, not the table), and a fusion whose root is a
  ``dynamic-update-slice`` of one of its operands (an in-place update) counts the update, not the buffer.
* **memory spaces**: on a TPU, memory-space assignment prefetches some buffers into on-chip memory
  (layouts marked ``S(1)``); writing or reading such a buffer is not HBM traffic and is not counted, while
  the read from HBM that fills it is.
* **collectives** (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, and their async
  ``-start`` forms) are counted per kind with their bytes per device (the larger of what goes in and what
  comes out).
* **conditionals** (``lax.switch``/``cond``) count their most expensive branch: an upper bound.

Everything is per device (an SPMD program is one device's program).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from seal_jax.lm.attention import KERNEL_BLOCK, TRITON_BACKWARD_BLOCK, causal_share

DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
    "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Operations that move no data of their own (views, tuples, control flow whose callees are counted).
_FREE = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "opt-barrier", "iota", "add-dependency", "domain",
    "async-done", "async-update", "copy-done", "send-done", "recv-done", "get-dimension-size",
})
_ARRAY = re.compile(r"\b(pred|token|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


class HloParseError(ValueError):
    """HLO text this module cannot read."""


@dataclasses.dataclass
class Instr:
    """One HLO instruction: ``name = shape opcode(operands), attrs``."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""


@dataclasses.dataclass
class Computation:
    """A named HLO computation and its instructions, in order."""

    name: str
    instrs: list[Instr]
    by_name: dict[str, Instr]

    @property
    def root(self) -> Instr:
        for ins in self.instrs:
            if ins.root:
                return ins
        return self.instrs[-1]


def _element_bits(dtype: str) -> int:
    if dtype in DTYPE_BITS:
        return DTYPE_BITS[dtype]
    if dtype.startswith("f8"):
        return 8
    raise HloParseError(f"unknown HLO element type {dtype!r}")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts and tiling ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _element_bits(dtype) // 8
    return total


_ARRAY_LAYOUT = re.compile(r"\b(pred|token|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](\{[^{}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")


def hbm_bytes(shape: str) -> int:
    """Like :func:`shape_bytes`, without the arrays whose layout puts them in an on-chip memory space
    (``S(1)`` and up: a TPU's memory-space assignment)."""
    total = 0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if layout and _ON_CHIP.search(layout):
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _element_bits(dtype) // 8
    return total


def shape_dims(shape: str) -> list[int]:
    """Dimensions of an array shape string such as ``bf16[4,128]{1,0}``."""
    m = _ARRAY.search(shape)
    if not m:
        raise HloParseError(f"not an array shape: {shape!r}")
    return [int(d) for d in filter(None, m.group(2).split(","))]


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth: list[str] = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth.append(pairs[c])
        elif depth and c == depth[-1]:
            depth.pop()
            if not depth:
                return i + 1
    raise HloParseError(f"unbalanced brackets in {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _parse_instr(line: str) -> Instr | None:
    body = line.strip()
    root = body.startswith("ROOT ")
    if root:
        body = body[5:]
    m = re.match(r"%?([\w.\-]+)\s*=\s*", body)
    if not m:
        return None
    name, i = m.group(1), m.end()
    if i < len(body) and body[i] == "(":
        j = _balanced(body, i)
    else:
        j = i
        while j < len(body) and body[j] != " ":
            if body[j] in "([{":
                j = _balanced(body, j)
            else:
                j += 1
    shape = body[i:j]
    rest = body[j:].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    k = _balanced(rest, m.end() - 1)
    operand_text = rest[m.end():k - 1]
    operands = []
    for piece in _split_top(operand_text):
        refs = re.findall(r"%([\w.\-]+)", piece)
        if refs:
            operands.append(refs[-1])
        elif re.fullmatch(r"[\w.\-]+", piece) and not re.fullmatch(r"-?[\d.]+|true|false", piece):
            operands.append(piece)
    return Instr(name, shape, opcode, operands, rest[k:], root, operand_text)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module's text and the name of its entry computation."""
    comps: dict[str, Computation] = {}
    entry = None
    current: list[Instr] | None = None
    name = ""
    for line in text.splitlines():
        stripped = line.strip()
        if current is None:
            m = _HEADER.match(stripped)
            if m and not stripped.startswith("HloModule"):
                name = m.group(2)
                current = []
                if m.group(1):
                    entry = name
            continue
        if stripped == "}":
            comps[name] = Computation(name, current, {i.name: i for i in current})
            current = None
            continue
        ins = _parse_instr(stripped)
        if ins is not None:
            current.append(ins)
    if entry is None:
        raise HloParseError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _attr_list(attrs: str, key: str) -> list[str]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    if not m:
        return []
    return [s.strip().lstrip("%") for s in m.group(1).split(",") if s.strip()]


def _backend_config(attrs: str) -> dict[str, Any]:
    i = attrs.find("backend_config=")
    if i < 0:
        return {}
    j = i + len("backend_config=")
    if j >= len(attrs) or attrs[j] != "{":
        return {}
    try:
        return json.loads(attrs[j:_balanced(attrs, j)])
    except (json.JSONDecodeError, HloParseError):
        return {}


@dataclasses.dataclass
class Loop:
    """A ``while`` loop of the program: where it is, its trip count (``None`` = data-dependent) and how
    many times the enclosing loops run it."""

    name: str
    computation: str
    trips: int | None
    outer_trips: int
    flops_per_trip: float
    bytes_per_trip: float


@dataclasses.dataclass
class HloStats:
    """Whole-program figures of one device's program (see the module docstring for what is counted)."""

    flops: float
    bytes: float
    collectives: dict[str, dict[str, float]]
    loops: list[Loop]
    custom_calls: dict[str, int]

    @property
    def collective_bytes(self) -> float:
        return float(sum(c["bytes"] for c in self.collectives.values()))

    def to_json(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes": self.bytes, "collectives": self.collectives,
                "collective_bytes": self.collective_bytes,
                "loops": [dataclasses.asdict(loop) for loop in self.loops], "custom_calls": self.custom_calls}


# Fused causal attention kernels: (pattern on the instruction, matmuls of [query rows, keys, head size]
# each, the axis of the key operand that holds the keys, the kernel's tile of tokens). Splash runs per
# key/value head (q [G, T, Dh], k [S, Dh]); its forward does QK and PV, its dq kernel QK, dO V^T and dS K,
# its dkv kernel QK, P^T dO, dO V^T and dS^T Q. The Triton kernel takes [..., T, H, Dh] (k [..., S, H, Dh]);
# its backward does the dkv kernel's four and the dq kernel's three, on tiles of 32 tokens.
ATTENTION_KERNELS: tuple[tuple[re.Pattern[str], int, int, int], ...] = (
    (re.compile(r"splash_m[qh]a_fwd"), 2, -2, KERNEL_BLOCK),
    (re.compile(r"splash_m[qh]a_dq"), 3, -2, KERNEL_BLOCK),
    (re.compile(r"splash_m[qh]a_dkv"), 4, -2, KERNEL_BLOCK),
    (re.compile(r'name = \\?"mha_forward"'), 2, -3, KERNEL_BLOCK),
    (re.compile(r'name = \\?"mha_backward"'), 7, -3, TRITON_BACKWARD_BLOCK),
)


@dataclasses.dataclass
class _Cost:
    flops: float = 0.0
    bytes: float = 0.0
    coll: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    custom: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, other: _Cost, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.bytes += other.bytes * times
        for k, (n, b) in other.coll.items():
            cur = self.coll.setdefault(k, [0.0, 0.0])
            cur[0] += n * times
            cur[1] += b * times
        for k, n in other.custom.items():
            self.custom[k] = self.custom.get(k, 0.0) + n * times


class _Analyzer:
    def __init__(self, comps: dict[str, Computation], unknown_trips: int):
        self.comps = comps
        self.unknown_trips = unknown_trips
        self.loops: list[Loop] = []
        self._cache: dict[str, _Cost] = {}

    # -- shapes -----------------------------------------------------------------------------------

    def _operand_shape(self, comp: Computation, name: str) -> str:
        ins = comp.by_name.get(name)
        return ins.shape if ins is not None else ""

    # -- FLOPs of one instruction -----------------------------------------------------------------

    def _kernel_flops(self, comp: Computation, ins: Instr) -> float:
        """The matmul FLOPs of a fused attention kernel (:data:`ATTENTION_KERNELS`), else 0: q is its first
        floating-point operand of rank 3 or more, k the next floating-point one."""
        kernel = next(((matmuls, axis, tile) for pattern, matmuls, axis, tile in ATTENTION_KERNELS
                       if pattern.search(ins.name) or pattern.search(ins.attrs)), None)
        if kernel is None:
            return 0.0
        matmuls, key_axis, tile = kernel
        floats = [shape for shape in (self._operand_shape(comp, o) for o in ins.operands)
                  if re.match(r"\s*\(?\s*(bf16|f\d+)\[", shape)]
        big = [i for i, shape in enumerate(floats) if len(shape_dims(shape)) >= 3]
        if not big or big[0] + 1 >= len(floats):
            return 0.0
        q, k = shape_dims(floats[big[0]]), shape_dims(floats[big[0] + 1])
        keys = k[key_axis]
        return 2.0 * matmuls * math.prod(q) * keys * causal_share(keys, tile)

    def _dot_flops(self, comp: Computation, ins: Instr) -> float:
        out = 1
        for d in shape_dims(ins.shape):
            out *= d
        if ins.opcode == "dot":
            lhs = shape_dims(self._operand_shape(comp, ins.operands[0]))
            contract = 1
            for d in _attr_list(ins.attrs, "lhs_contracting_dims"):
                contract *= lhs[int(d)]
            return 2.0 * out * contract
        return 2.0 * _convolution_fmas(ins.attrs, self._operand_shape(comp, ins.operands[0]),
                                       self._operand_shape(comp, ins.operands[1]), ins.shape)

    def _is_dot_sum(self, comp: Computation, ins: Instr) -> bool:
        """A ``reduce`` a compiler made of a ``dot_general``: one array of products (a ``multiply``, seen
        through converts, bitcasts, copies and reshapes) summed with an add, its metadata naming the dot it
        came from. A sum of a dot's partial results (a GPU's split-K) or of another sum's (a reduction in two
        stages) reads no ``multiply`` and is not counted again."""
        reducer = self.comps.get(_attr(ins.attrs, "to_apply") or "")
        if (len(ins.operands) != 2 or reducer is None or reducer.root.opcode != "add"
                or re.search(r'op_name="[^"]*dot_general"', ins.attrs) is None):
            return False
        operand = comp.by_name.get(ins.operands[0])
        while operand is not None and operand.opcode in ("convert", "bitcast", "copy", "reshape"):
            operand = comp.by_name.get(operand.operands[0]) if operand.operands else None
        return operand is not None and operand.opcode == "multiply"

    # -- bytes of one top-level instruction -------------------------------------------------------

    def _fusion_bytes(self, comp: Computation, ins: Instr) -> float:
        callee = self.comps.get(_attr(ins.attrs, "calls") or "")
        out_bytes = hbm_bytes(ins.shape)
        if callee is None:
            return out_bytes + sum(hbm_bytes(self._operand_shape(comp, o)) for o in ins.operands)
        param_index = self._param_indices(callee)
        root = callee.root
        total = 0.0
        # an output that is a dynamic-update-slice of a parameter (or a chain of them) is that buffer updated
        # in place: it writes the updates only, and the updates do not read it (also as one element of a
        # multi-output fusion's tuple, as libtpu writes a scanned layer's saved activations into their
        # stacked buffer); the parameter's other uses in the fusion still read it
        outputs = [callee.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
        updates = [self._in_place_updates(callee, o) if o is not None else None for o in outputs]
        in_place: set[str] = set()
        if any(updates):
            out_bytes = 0
            for o, found in zip(outputs, updates, strict=True):
                if o is None:
                    continue
                if found is None or found[0] in in_place:  # not in place, or the same buffer returned twice
                    out_bytes += hbm_bytes(o.shape)
                else:
                    in_place.add(found[0])
                    out_bytes += found[1]
        for pname, idx in param_index.items():
            if idx >= len(ins.operands):
                continue
            full = hbm_bytes(self._operand_shape(comp, ins.operands[idx]))
            if full == 0:
                continue
            sliced = self._sliced_read(callee, pname, updated=pname in in_place)
            total += full if sliced is None else min(full, sliced)
        return total + out_bytes

    def _in_place_updates(self, comp: Computation, node: Instr) -> tuple[str, int] | None:
        """``(parameter, bytes written)`` when ``node`` (through bitcasts) is a chain of dynamic-update-slices
        whose base is a parameter of ``comp``, else None."""
        while node.opcode == "bitcast" and node.operands and node.operands[0] in comp.by_name:
            node = comp.by_name[node.operands[0]]
        written = 0
        while node.opcode == "dynamic-update-slice" and len(node.operands) > 1:
            written += shape_bytes(self._operand_shape(comp, node.operands[1]))
            base = comp.by_name.get(node.operands[0])
            while base is not None and base.opcode == "bitcast" and base.operands:
                base = comp.by_name.get(base.operands[0])
            if base is None:
                return None
            node = base
        return (node.name, written) if written and node.opcode == "parameter" else None

    def _sliced_read(self, comp: Computation, name: str, depth: int = 0, updated: bool = False) -> float | None:
        """Bytes read of value ``name`` in ``comp`` when every use reads it through (dynamic-)slices or
        gathers, following bitcasts and nested fusions; ``None`` when some use reads all of it. ``updated``:
        ``name`` is a buffer the fusion updates in place, so being the base of a dynamic-update-slice (or
        of a bitcast on the way to one) reads none of it."""
        if depth > 8:
            return None
        total = 0.0
        uses = [i for i in comp.instrs if name in i.operands]
        if not uses:  # returned as it is (a root), or not used
            return 0.0 if updated or comp.root.name != name else None
        for u in uses:
            if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == name:
                total += shape_bytes(u.shape)
            elif updated and u.opcode == "tuple" and u is comp.root:  # returned: the output, not a read
                continue
            elif updated and u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                inner = self._sliced_read(comp, u.name, depth + 1, updated=True)  # the updated buffer's reads
                if inner is None:
                    return None
                total += inner
            elif u.opcode == "bitcast":
                inner = self._sliced_read(comp, u.name, depth + 1, updated)
                if inner is None:
                    return None
                total += inner
            elif u.opcode == "fusion" and (callee := self.comps.get(_attr(u.attrs, "calls") or "")) is not None:
                index = u.operands.index(name)
                pname = next((p for p, i in self._param_indices(callee).items() if i == index), None)
                inner = None if pname is None else self._sliced_read(callee, pname, depth + 1)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total

    @staticmethod
    def _param_indices(comp: Computation) -> dict[str, int]:
        out = {}
        for i in comp.instrs:
            if i.opcode == "parameter":
                if i.args.strip().isdigit():
                    out[i.name] = int(i.args)
        return out

    # -- loops ------------------------------------------------------------------------------------

    def _trip_count(self, comp: Computation, ins: Instr) -> int | None:
        known = _backend_config(ins.attrs).get("known_trip_count")
        if isinstance(known, dict) and "n" in known:
            return int(known["n"])
        cond = self.comps.get(_attr(ins.attrs, "condition") or "")
        if cond is None:
            return None
        root = cond.root
        if root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
            return None

        def through(c: Computation, name: str) -> Instr | None:
            node = c.by_name.get(name)
            while node is not None and node.opcode in ("bitcast", "copy", "convert", "reshape") and node.operands:
                node = c.by_name.get(node.operands[0])
            return node

        counter, limit = through(cond, root.operands[0]), through(cond, root.operands[1])
        if counter is None or limit is None or counter.opcode != "get-tuple-element" or limit.opcode != "constant":
            return None
        n = _constant_int(limit)
        index = re.search(r"index=(\d+)", counter.attrs)
        if n is None or index is None:
            return None
        start = 0
        init = through(comp, ins.operands[0]) if ins.operands else None
        if init is not None and init.opcode == "tuple" and int(index.group(1)) < len(init.operands):
            first = through(comp, init.operands[int(index.group(1))])
            if first is not None and first.opcode == "constant":
                start = _constant_int(first) or 0
        return max(0, n - start)

    # -- whole computations -----------------------------------------------------------------------

    def cost(self, name: str, top: bool = True, outer: int = 1) -> _Cost:
        key = f"{name}/{top}"
        if key in self._cache:
            return self._cache[key]
        comp = self.comps[name]
        total = _Cost()
        for ins in comp.instrs:
            op = ins.opcode
            if op in ("dot", "convolution"):
                total.flops += self._dot_flops(comp, ins)
            elif op == "reduce" and self._is_dot_sum(comp, ins):
                total.flops += 2.0 * math.prod(shape_dims(self._operand_shape(comp, ins.operands[0])))
            elif op == "fusion":
                callee = _attr(ins.attrs, "calls")
                if callee in self.comps:
                    total.flops += self.cost(callee, top=False).flops
            elif op == "while":
                trips = self._trip_count(comp, ins)
                body = self.cost(_attr(ins.attrs, "body") or "", top=True, outer=outer * (trips or self.unknown_trips))
                self.loops.append(Loop(ins.name, name, trips, outer, body.flops, body.bytes))
                total.add(body, trips if trips is not None else self.unknown_trips)
                continue
            elif op == "conditional":
                branches = _attr_list(ins.attrs, "branch_computations") or [
                    b for b in (_attr(ins.attrs, "true_computation"), _attr(ins.attrs, "false_computation")) if b]
                costs = [self.cost(b, top=True, outer=outer) for b in branches if b in self.comps]
                if costs:
                    total.add(max(costs, key=lambda c: (c.flops, c.bytes)))
                continue
            elif op in ("call", "async-start"):
                callee = _attr(ins.attrs, "to_apply") or _attr(ins.attrs, "calls")
                if callee in self.comps:
                    total.add(self.cost(callee, top=True, outer=outer))
                continue
            if not top:
                continue
            kind = op[:-6] if op.endswith("-start") else op
            if kind in COLLECTIVES:
                size = max([shape_bytes(ins.shape) if not op.endswith("-start") else _largest_array(ins.shape)]
                           + [shape_bytes(self._operand_shape(comp, o)) for o in ins.operands])
                cur = total.coll.setdefault(kind, [0.0, 0.0])
                cur[0] += 1
                cur[1] += size
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
                t = target.group(1) if target else "?"
                total.custom[t] = total.custom.get(t, 0.0) + 1
                total.flops += self._kernel_flops(comp, ins)
            if op in _FREE or op.endswith("-done"):
                continue
            if op == "fusion":
                total.bytes += self._fusion_bytes(comp, ins)
            elif op == "dynamic-update-slice" and len(ins.operands) > 1:
                total.bytes += 2 * shape_bytes(self._operand_shape(comp, ins.operands[1]))
            elif op in ("dynamic-slice", "slice"):
                source = hbm_bytes(self._operand_shape(comp, ins.operands[0])) if ins.operands else 0
                total.bytes += (shape_bytes(ins.shape) if source else 0) + hbm_bytes(ins.shape)
            else:
                total.bytes += hbm_bytes(ins.shape) + sum(hbm_bytes(self._operand_shape(comp, o))
                                                          for o in ins.operands)
        self._cache[key] = total
        return total


def _window(attrs: str) -> dict[str, list[list[int]]]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out: dict[str, list[list[int]]] = {}
    if not m:
        return out
    for item in m.group(1).split():
        key, _, value = item.partition("=")
        out[key] = [[int(v) for v in part.split("_")] for part in value.split("x")]
    return out


def _convolution_fmas(attrs: str, lhs_shape: str, rhs_shape: str, out_shape: str) -> float:
    """Multiply-adds of a convolution, counting only kernel taps that land on real (not padding, not
    dilation-hole) input elements, as XLA's cost analysis does; the TPU compiler writes batched matmuls as
    convolutions whose padded windows would otherwise count several times the real work."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    lhs, rhs, out = shape_dims(lhs_shape), shape_dims(rhs_shape), shape_dims(out_shape)
    if not labels:
        return float(np.prod(out))
    lhs_l, rhs_l, out_l = labels.groups()
    batch = lhs[lhs_l.index("b")]
    in_feature = lhs[lhs_l.index("f")]
    out_feature = rhs[rhs_l.index("o")]
    groups = int(m.group(1)) if (m := re.search(r"feature_group_count=(\d+)", attrs)) else 1
    batch_groups = int(m.group(1)) if (m := re.search(r"batch_group_count=(\d+)", attrs)) else 1
    win = _window(attrs)
    fmas = float(in_feature // groups) * out_feature * (batch // batch_groups)
    spatial = sorted(c for c in lhs_l if c.isdigit())
    for d, label in enumerate(spatial):
        n_in, n_out = lhs[lhs_l.index(label)], out[out_l.index(label)]
        size = rhs[rhs_l.index(label)]
        stride = win.get("stride", [[1]] * len(spatial))[d][0]
        pad_lo = win.get("pad", [[0, 0]] * len(spatial))[d][0]
        lhs_dil = win.get("lhs_dilate", [[1]] * len(spatial))[d][0]
        rhs_dil = win.get("rhs_dilate", [[1]] * len(spatial))[d][0]
        pos = (np.arange(n_out)[:, None] * stride + np.arange(size)[None, :] * rhs_dil) - pad_lo
        valid = (pos >= 0) & (pos <= (n_in - 1) * lhs_dil) & (pos % lhs_dil == 0)
        fmas *= float(valid.sum())
    return fmas


def _largest_array(shape: str) -> int:
    sizes = [shape_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(shape)]
    return max(sizes, default=0)


def _constant_int(ins: Instr) -> int | None:
    try:
        return int(ins.args.strip())
    except ValueError:
        return None


def analyze(text: str, unknown_trips: int = 1) -> HloStats:
    """Whole-program :class:`HloStats` of one device's optimised HLO ``text`` (``compiled.as_text()``).

    ``unknown_trips``: how many times to count a loop whose trip count is not static (see the module
    docstring); such loops are listed in :attr:`HloStats.loops` with ``trips=None``.
    """
    comps, entry = parse_module(text)
    analyzer = _Analyzer(comps, max(1, int(unknown_trips)))
    cost = analyzer.cost(entry, top=True)
    collectives = {k: {"count": n, "bytes": b} for k, (n, b) in sorted(cost.coll.items())}
    custom = {k: int(v) for k, v in sorted(cost.custom.items())}
    loops = _dedupe(analyzer.loops)
    return HloStats(cost.flops, cost.bytes, collectives, loops, custom)


def _dedupe(loops: Iterable[Loop]) -> list[Loop]:
    seen: dict[tuple[str, str], Loop] = {}
    for loop in loops:
        seen.setdefault((loop.computation, loop.name), loop)
    return list(seen.values())
