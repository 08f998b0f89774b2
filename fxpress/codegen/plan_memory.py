"""plan_memory: lay out every intermediate buffer of a schedule in one arena.

A pure function of the schedule. It picks a kernel order (the graph's, or a memory-aware
topological order that runs next the ready kernel which frees most and allocates least, whichever
peaks lower), derives each arena buffer's live range from the first kernel that writes it to the
last that reads it or a view of it, and assigns offsets greedily by size.

Sizes are sympy expressions. Decisions (order, packing) use the sizes at the graph's example
shapes (``hints``); offsets stay expressions, so a plan is evaluated per call and a growing
sequence length never recompiles. With static sizes a buffer may fill any gap below it; with
symbolic ones it sits above every buffer it overlaps in time (``Max`` of their ends), which keeps
the layout valid for every value of the symbols.

A kernel's output may take the memory of an input that dies at that kernel when the kernel reads
each element (or row) before writing the same one (``Kernel.overwritable``: pointwise and row
kernels, row-local fxpress ops): the residual ``add`` and the LayerNorm after it, a factored Linear
over the attention output. Such pairs share one offset; ``MemoryPlan.reuses`` lists them.

Graph inputs, outputs, constants and KV state are never planned into the arena. Kernels that write
a graph input in place (a cache update) keep their place relative to every other kernel.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Mapping

import sympy

from fxpress.codegen.schedule import Schedule

ALIGN = 64


@dataclass(frozen=True)
class Slot:
    buffer: str
    offset: sympy.Expr
    nbytes: sympy.Expr  # aligned size
    start: int  # position in MemoryPlan.order of the kernel that writes it
    end: int  # position of the last kernel that reads it (directly or through a view)


@dataclass(frozen=True)
class MemoryPlan:
    order: tuple[str, ...]  # kernel names, in execution order
    slots: dict[str, Slot]
    arena_bytes: sympy.Expr
    lower_bound_bytes: sympy.Expr  # most bytes live at once in this order
    naive_bytes: sympy.Expr  # every buffer its own allocation
    hints: dict[str, int] = field(default_factory=dict)  # symbol values decisions were made at
    order_chosen: str = "graph"
    # In-place reuse: buffer -> the input it overwrites (same offset; the input dies as it is born).
    reuses: dict[str, str] = field(default_factory=dict)

    def evaluate(self, expr: sympy.Expr, values: Mapping[str, int] | None = None) -> int:
        """An expression of this plan at concrete symbol values (the hints by default)."""
        values = self.hints if values is None else values
        return int(sympy.sympify(expr).subs({sympy.Symbol(k, integer=True, positive=True): v
                                             for k, v in values.items()}))

    def figures(self) -> dict[str, int]:
        return {name: self.evaluate(getattr(self, name))
                for name in ("arena_bytes", "lower_bound_bytes", "naive_bytes")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": list(self.order), "order_chosen": self.order_chosen, "hints": self.hints,
            "arena_bytes": str(self.arena_bytes), "lower_bound_bytes": str(self.lower_bound_bytes),
            "naive_bytes": str(self.naive_bytes), "figures": self.figures(), "reuses": dict(self.reuses),
            "slots": {n: {"offset": str(s.offset), "nbytes": str(s.nbytes), "start": s.start,
                          "end": s.end} for n, s in self.slots.items()},
        }


def _aligned(nbytes: sympy.Expr) -> sympy.Expr:
    """Round up to a multiple of ALIGN. A symbolic size becomes the polynomial whose every
    coefficient is rounded up to a multiple of ALIGN: an upper bound (symbols are non-negative)
    that stays a multiple of ALIGN for every value of the symbols."""
    if nbytes.is_number:
        return sympy.Integer(-(-int(nbytes) // ALIGN) * ALIGN)
    return _to_expr({m: -(-c // ALIGN) * ALIGN for m, c in _to_poly(nbytes).items()})


# Symbolic sizes and offsets as polynomials: {((symbol, power), ...): integer coefficient}.
Poly = dict


def _to_poly(expr: sympy.Expr) -> Poly:
    expr = sympy.expand(expr)
    symbols = sorted(expr.free_symbols, key=str)
    out: Poly = {}
    for powers, coeff in sympy.Poly(expr, *symbols).terms() if symbols else [((), expr)]:
        monomial = tuple((str(sym), p) for sym, p in zip(symbols, powers) if p)
        out[monomial] = out.get(monomial, 0) + int(sympy.ceiling(coeff))  # rounding up bounds
    return out


def _to_expr(poly: Poly) -> sympy.Expr:
    return sympy.Add(*[c * sympy.Mul(*[sympy.Symbol(n, integer=True, positive=True) ** p for n, p in m])
                       for m, c in poly.items()])


def _add(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0) + c
    return out


def _dominates(a: Poly, b: Poly) -> bool:
    """a >= b for every non-negative value of the symbols (coefficient by coefficient)."""
    return all(a.get(m, 0) >= b.get(m, 0) for m in set(a) | set(b))


def _max_terms(terms: list[Poly]) -> list[Poly]:
    """The terms of Max(*terms) that no other term dominates."""
    kept: list[Poly] = []
    for t in terms:
        if any(_dominates(k, t) for k in kept):
            continue
        kept = [k for k in kept if not _dominates(t, k)] + [t]
    return kept


def _base(schedule: Schedule, name: str) -> str:
    buffer = schedule.buffers.get(name)
    return buffer.alias_of if buffer is not None and buffer.alias_of else name


def _planned(schedule: Schedule) -> dict[str, sympy.Expr]:
    return {n: _aligned(b.nbytes) for n, b in schedule.buffers.items() if b.role == "arena"}


def _dependencies(schedule: Schedule) -> list[set[int]]:
    """For each kernel (graph order), the kernels it must follow: the writers of the buffers it
    reads, the kernels computing the sizes it uses, and the last input mutation before it."""
    writer = {w: i for i, k in enumerate(schedule.kernels) for w in k.writes}
    producer = {n: i for i, k in enumerate(schedule.kernels) for n in k.nodes}
    deps: list[set[int]] = []
    barrier = -1  # the last kernel that mutates a graph input
    for i, kernel in enumerate(schedule.kernels):
        d = {writer[r] for r in kernel.reads if r in writer} | {producer[n] for n in kernel.needs if n in producer}
        if kernel.mutates:
            d |= set(range(barrier + 1, i))  # everything since the last barrier stays before it
            barrier = i
        elif barrier >= 0:
            d.add(barrier)
        deps.append(d)
    return deps


def _live_ranges(schedule: Schedule, order: list[int], sizes: dict[str, sympy.Expr]) -> dict[str, tuple[int, int]]:
    position = {k: p for p, k in enumerate(order)}
    ranges: dict[str, tuple[int, int]] = {}
    for k in order:
        kernel = schedule.kernels[k]
        for w in kernel.writes:
            if w in sizes:
                ranges[w] = (position[k], position[k])
    for k in order:
        for r in schedule.kernels[k].reads:
            base = _base(schedule, r)
            if base in ranges:
                start, end = ranges[base]
                ranges[base] = (start, max(end, position[k]))
    return ranges


def _merge_reuses(schedule: Schedule, order: list[int], ranges: dict[str, tuple[int, int]],
                  sizes: dict[str, sympy.Expr]) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Let a kernel's output take the memory of an input that dies at that kernel, where the
    kernel allows it (``Kernel.overwritable``) and the sizes agree. Returns the live ranges of the
    storage groups (keyed by the first buffer of each group) and ``{buffer: input it overwrites}``."""
    merged = dict(ranges)
    reuses: dict[str, str] = {}
    group: dict[str, str] = {}  # buffer -> first buffer of its storage group
    for position, k in enumerate(order):
        kernel = schedule.kernels[k]
        if not kernel.overwritable or kernel.writes[0] not in merged:
            continue
        out = kernel.writes[0]
        for x in kernel.overwritable:
            root = group.get(x, x)
            if x in sizes and root in merged and merged[root][1] == position and \
                    sympy.expand(sizes[x] - sizes[out]) == 0:
                merged[root] = (merged[root][0], merged.pop(out)[1])
                group[out], reuses[out] = root, x
                break
    return merged, reuses


def _peak(ranges: dict[str, tuple[int, int]], sizes: dict[str, int], steps: int) -> int:
    delta = [0] * (steps + 1)
    for name, (start, end) in ranges.items():
        delta[start] += sizes[name]
        delta[end + 1] -= sizes[name]
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def _memory_aware_order(schedule: Schedule, deps: list[set[int]], sizes: dict[str, int]) -> list[int]:
    """Topological order: next, the ready kernel that allocates least net of what it frees."""
    n = len(schedule.kernels)
    users: list[list[int]] = [[] for _ in range(n)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    readers_left: dict[str, int] = {}
    for kernel in schedule.kernels:
        for r in kernel.reads:
            base = _base(schedule, r)
            if base in sizes:
                readers_left[base] = readers_left.get(base, 0) + 1

    def score(i: int) -> tuple[int, int]:
        kernel = schedule.kernels[i]
        allocated = sum(sizes.get(w, 0) for w in kernel.writes)
        freed = sum(sizes[b] for b in {_base(schedule, r) for r in kernel.reads}
                    if b in sizes and readers_left[b] == sum(_base(schedule, r) == b for r in kernel.reads))
        return (allocated - freed, i)

    ready = [score(i) for i in range(n) if remaining[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for r in schedule.kernels[i].reads:
            base = _base(schedule, r)
            if base in readers_left:
                readers_left[base] -= 1
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, score(u))
        # Scores of kernels already waiting change as buffers lose readers; refresh them.
        ready = [score(j) for _, j in ready]
        heapq.heapify(ready)
    if len(order) != n:
        raise AssertionError("schedule has a dependency cycle")
    return order


def _offsets(ranges: dict[str, tuple[int, int]], sizes: dict[str, sympy.Expr],
             hint_sizes: dict[str, int]) -> dict[str, sympy.Expr]:
    static = all(s.is_number for s in sizes.values())
    order = sorted(ranges, key=lambda n: (-hint_sizes[n], ranges[n][0], n))
    if static:
        return _static_offsets(order, ranges, {n: int(s) for n, s in sizes.items()})
    polys = {n: _to_poly(sizes[n]) for n in order}
    placed: list[str] = []
    terms: dict[str, list[Poly]] = {}
    for name in order:
        start, end = ranges[name]
        ends = [_add(t, polys[p]) for p in placed
                if ranges[p][0] <= end and start <= ranges[p][1] for t in terms[p]]
        terms[name] = _max_terms(ends) or [{}]
        placed.append(name)
    return {n: sympy.Max(*[_to_expr(t) for t in ts]) if len(ts) > 1 else _to_expr(ts[0])
            for n, ts in terms.items()}


def _static_offsets(order: list[str], ranges: dict[str, tuple[int, int]], sizes: dict[str, int]) -> dict[str, sympy.Expr]:
    """Greedy by size: each buffer at the lowest offset free for all of its lifetime."""
    placed: list[tuple[int, str]] = []
    offsets: dict[str, sympy.Expr] = {}
    for name in order:
        start, end = ranges[name]
        offset = 0
        for other_offset, other in sorted((o, p) for o, p in placed
                                          if ranges[p][0] <= end and start <= ranges[p][1]):
            if offset + sizes[name] <= other_offset:
                break  # fits in the gap below this one
            offset = max(offset, other_offset + sizes[other])
        offsets[name] = sympy.Integer(offset)
        placed.append((offset, name))
    return offsets


def plan_memory(schedule: Schedule, hints: Mapping[str, int] | None = None) -> MemoryPlan:
    """Choose an order and lay out the schedule's arena buffers; see the module docstring."""
    hints = dict(hints or {})
    sizes = _planned(schedule)
    subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in hints.items()}
    hint_sizes = {n: int(s) if s.is_number else int(s.subs(subs)) for n, s in sizes.items()}
    deps = _dependencies(schedule)
    candidates = {"graph": list(range(len(schedule.kernels))),
                  "memory-aware": _memory_aware_order(schedule, deps, hint_sizes)}
    best_name, best_order, best_ranges, best_peak = None, None, None, None
    for name, order in candidates.items():
        ranges = _live_ranges(schedule, order, sizes)
        merged, reuses = _merge_reuses(schedule, order, ranges, sizes)
        peak = _peak(merged, hint_sizes, len(order))
        if best_peak is None or peak < best_peak:
            best_name, best_order, best_peak = name, order, peak
            best_ranges, best_merged, best_reuses = ranges, merged, reuses
    offsets = _offsets(best_merged, sizes, hint_sizes)
    group_of = {}
    for buffer, overwritten in best_reuses.items():  # reuses come in execution order
        group_of[buffer] = group_of.get(overwritten, overwritten)
    slots = {n: Slot(n, offsets[group_of.get(n, n)], sizes[n], *best_ranges[n]) for n in best_ranges}
    arena = _arena_bytes(slots)
    lower = _symbolic_peak(best_merged, sizes, len(best_order))
    return MemoryPlan(
        order=tuple(schedule.kernels[i].name for i in best_order), slots=slots,
        arena_bytes=arena,
        lower_bound_bytes=lower, naive_bytes=sympy.Add(*sizes.values()),
        hints=hints, order_chosen=best_name, reuses=best_reuses,
    )


def _arena_bytes(slots: dict[str, Slot]) -> sympy.Expr:
    if not slots:
        return sympy.Integer(0)
    if all(s.offset.is_number and s.nbytes.is_number for s in slots.values()):
        return sympy.Integer(max(int(s.offset) + int(s.nbytes) for s in slots.values()))
    ends = [_add(_to_poly(term), _to_poly(s.nbytes)) for s in slots.values()
            for term in (s.offset.args if isinstance(s.offset, sympy.Max) else (s.offset,))]
    kept = _max_terms(ends)
    return sympy.Max(*[_to_expr(t) for t in kept]) if len(kept) > 1 else _to_expr(kept[0])


def _symbolic_peak(ranges: dict[str, tuple[int, int]], sizes: dict[str, sympy.Expr], steps: int) -> sympy.Expr:
    live_at = [[] for _ in range(steps)]
    for name, (start, end) in ranges.items():
        for t in range(start, end + 1):
            live_at[t].append(sizes[name])
    totals = {sympy.Add(*live) for live in live_at if live}
    return sympy.Max(*totals) if totals else sympy.Integer(0)


def check_plan(plan: MemoryPlan, values: Mapping[str, int] | None = None) -> None:
    """Prove, at the given symbol values (the hints by default), that no two buffers live at the
    same time share a byte, and that every buffer lies inside the arena."""
    arena = plan.evaluate(plan.arena_bytes, values)
    spans = sorted(
        (plan.evaluate(s.offset, values), plan.evaluate(s.nbytes, values), s.start, s.end, s.buffer)
        for s in plan.slots.values()
    )
    for i, (offset, size, start, end, name) in enumerate(spans):
        if offset < 0 or offset + size > arena or offset % ALIGN:
            raise AssertionError(f"buffer {name} at [{offset}, {offset + size}) is outside the "
                                 f"{arena}-byte arena or misaligned")
        for other_offset, other_size, other_start, other_end, other in spans[i + 1:]:
            if other_offset >= offset + size:
                break  # sorted by offset: nothing further can overlap this one
            in_place = (plan.reuses.get(other) == name and other_offset == offset and other_start == end) \
                or (plan.reuses.get(name) == other and other_offset == offset and start == other_end)
            if other_start <= end and start <= other_end and not in_place:
                raise AssertionError(f"buffers {name} and {other} overlap in the arena while both live")
