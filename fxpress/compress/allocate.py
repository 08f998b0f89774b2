"""One option per layer under a global budget, by measured error per unit of cost.

Each layer offers options (a cost: bytes or parameters; an error: measured, additive across layers
to first order). Every layer starts at its cheapest option; the upgrade that removes the most error
per unit of cost is taken while it fits. Upgrades run along each layer's lower convex hull of
(cost, error), so an option that buys error dearly is never a step on the way to a better one.
``fxpress.fit`` chooses bits, ranks and KV state with it; ``compress.svd`` chooses ranks.
"""

from __future__ import annotations

import heapq
from typing import Callable, Protocol, Sequence, TypeVar


class HasError(Protocol):
    error: float


Choice = TypeVar("Choice", bound=HasError)


def lower_hull(options: Sequence[Choice], cost: Callable[[Choice], int]) -> list[Choice]:
    """The options on the lower convex hull of (cost, error), by cost: each one buys less error
    per unit of cost than the one before."""
    points: list[Choice] = []
    for o in sorted(options, key=lambda o: (cost(o), o.error)):
        if points and o.error >= points[-1].error:
            continue  # costs more, removes no error
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            if (b.error - a.error) * (cost(o) - cost(a)) >= (o.error - a.error) * (cost(b) - cost(a)):
                points.pop()  # b lies on or above the line from a to o
            else:
                break
        points.append(o)
    return points


def allocate(options: dict[str, Sequence[Choice]], budget: float,
             cost: Callable[[Choice], int]) -> dict[str, Choice] | None:
    """Per layer, the option chosen greedily within ``budget``; None when even the cheapest
    option of every layer costs more."""
    hulls = {name: lower_hull(opts, cost) for name, opts in options.items()}
    at = {name: 0 for name in hulls}
    spent = sum(cost(h[0]) for h in hulls.values())
    if spent > budget:
        return None
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i = at[name]
        if i + 1 < len(hulls[name]):
            a, b = hulls[name][i], hulls[name][i + 1]
            heapq.heappush(heap, (-(a.error - b.error) / max(cost(b) - cost(a), 1), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        a, b = hulls[name][at[name]], hulls[name][at[name] + 1]
        if spent + cost(b) - cost(a) > budget:
            continue  # this layer's next step does not fit; smaller steps of others may
        spent += cost(b) - cost(a)
        at[name] += 1
        push(name)
    return {name: hulls[name][i] for name, i in at.items()}
