"""Kernels a compiled XLA program launches and the bytes they read and write, counted from its
optimised HLO text: how much memory traffic a GPU program makes, measured without the GPU
(``gpu_aot_compile.py``).

Every instruction of the entry computation is one kernel (a fusion, a cuDNN or cuBLAS call, a
copy), except parameters, tuples and their elements, bitcasts and constants, which move nothing;
a while loop's body counts as many times as XLA knows it runs (``known_trip_count``, else once).
A kernel reads each operand whole and writes its result, except that an operand a fusion uses
only through slices (element-wise operations and concatenations before them included) is read
as its slices: XLA computes only the sliced elements. Nothing is assumed to stay in a cache, so
on a GPU this is the traffic to its memory when no operand is still in L2. A loop step's bytes
are also broken down by the operation each kernel came from (its ``op_name``).
"""

from __future__ import annotations

import collections
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES.update({"f64": 8, "s64": 8, "u64": 8})
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_MOVES_NOTHING = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
# Operations through which a fusion computes only the elements a slice after them takes: each
# output element reads one element of each operand (of one operand, for a concatenation).
_SLICED_THROUGH = {"convert", "bitcast", "reshape", "copy", "add", "subtract", "multiply", "divide", "negate"}
_SLICED_THROUGH |= {"maximum", "minimum", "exponential", "logistic", "select", "compare", "rsqrt", "sqrt", "tanh"}
_SLICED_THROUGH |= {"concatenate"}


def array_bytes(shape: str) -> int:
    """Bytes of an HLO shape, e.g. ``bf16[1,448,448,128]{3,2,1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def computations(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
    """Computation name -> [(instruction, shape, opcode, rest of the line)] of an HLO module's
    text, and the entry computation's name."""
    parsed: dict[str, list[tuple]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = parsed.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            current.append(instruction.groups())
    return parsed, entry


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split("), ")[0])


def _sliced_operand_bytes(body: list[tuple]) -> dict[int, int]:
    """Parameter number -> bytes a fusion reads of it, for the parameters it uses only through
    slices."""
    users, shapes, numbers = collections.defaultdict(list), {}, {}
    for name, shape, opcode, rest in body:
        shapes[name] = (opcode, array_bytes(shape))
        if opcode == "parameter":
            numbers[name] = int(re.match(r"(\d+)", rest).group(1))
        for operand in _operands(rest):
            users[operand].append(name)

    def sliced_bytes(name: str) -> int | None:
        total = 0
        for user in users.get(name) or [None]:
            if user is None:
                return None
            opcode, size = shapes[user]
            if opcode in ("slice", "dynamic-slice"):
                total += size
                continue
            inner = sliced_bytes(user) if opcode in _SLICED_THROUGH else None
            if inner is None:
                return None
            total += inner
        return total

    return {number: b for name, number in numbers.items() if (b := sliced_bytes(name)) is not None}


def _while_body(rest: str) -> str:
    return re.search(r"body=%?([\w.\-]+)", rest).group(1)


def _kernels(computations: dict, name: str, runs: int = 1):
    """(source, runs, bytes a run) of each kernel one run of computation ``name`` launches, its
    while loops' bodies included (``runs`` times the trip count XLA knows)."""
    sizes = {instruction: array_bytes(shape) for instruction, shape, _, _ in computations[name]}
    for _, shape, opcode, rest in computations[name]:
        if opcode in _MOVES_NOTHING:
            continue
        if opcode == "while":
            known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            yield from _kernels(computations, _while_body(rest), runs * (int(known.group(1)) if known else 1))
            continue
        read = [sizes.get(operand, 0) for operand in _operands(rest)]
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and called:
            for number, size in _sliced_operand_bytes(computations[called.group(1)]).items():
                read[number] = min(read[number], size)
        yield _source(rest), runs, sum(read) + array_bytes(shape)


def _source(rest: str) -> str:
    """An instruction's ``op_name`` after the last call (a loop body's network path), its layer
    numbers replaced by # so that the same operation of every block is one source."""
    op_name = re.search(r'op_name="([^"]*)"', rest)
    path = op_name.group(1).rsplit("closed_call/", 1)[-1] if op_name else ""
    return re.sub(r"\d+", "#", path)


def _totals(kernels: list[tuple[str, int, int]]) -> tuple[int, int]:
    """(kernels launched, bytes moved) of ``_kernels``' records."""
    return sum(runs for _, runs, _ in kernels), sum(runs * moved for _, runs, moved in kernels)


def _longest_loop_body(parsed: dict) -> str | None:
    bodies = [_while_body(rest) for body in parsed.values() for *_, opcode, rest in body if opcode == "while"]
    return max(bodies, key=lambda b: len(parsed[b])) if bodies else None


def program_traffic(hlo_text: str) -> dict:
    """``kernels`` launched and ``kernel_bytes`` read and written by one run of the program, and
    of one iteration of its longest while loop (``loop_kernels``, ``loop_kernel_bytes``: a
    sampler's step) where it has one, with that iteration's bytes and kernels per source
    operation, the largest first (``loop_bytes_by_source``: {source: [kernels, bytes]})."""
    parsed, entry = computations(hlo_text)
    kernels, moved = _totals(list(_kernels(parsed, entry)))
    result = {"kernels": kernels, "kernel_bytes": moved}
    body = _longest_loop_body(parsed)
    if body:
        step = list(_kernels(parsed, body))
        result["loop_kernels"], result["loop_kernel_bytes"] = _totals(step)
        by_source = collections.defaultdict(lambda: [0, 0])
        for source, runs, moved in step:
            by_source[source][0] += runs
            by_source[source][1] += runs * moved
        result["loop_bytes_by_source"] = dict(sorted(by_source.items(), key=lambda item: -item[1][1]))
    return result
