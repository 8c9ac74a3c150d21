"""Exact ONNX graph passes: rewrites that compute bit-identical logits (each one proven by a test)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PassResult:
    name: str
    count: int  # how many places the pass rewrote
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def swap_elu_maxpool(model) -> PassResult:
    """X -> Elu -> MaxPool  becomes  X -> MaxPool -> Elu (in place).

    Exact: for alpha >= 0 ELU is monotonic non-decreasing, so max over a window of ELU(x) is
    ELU(max over the window of x), the very same float; MaxPool's padding never wins a max.
    The Elu then runs on a quarter of the elements (2x2 pool), and int8 quantizers see
    Conv -> MaxPool, which they keep in int8.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)
    nodes = list(graph.node)
    swapped = 0
    for elu in nodes:
        if elu.op_type != "Elu" or elu.domain not in ("", "ai.onnx"):
            continue
        if float(_attr(elu, "alpha", 1.0)) < 0 or elu.output[0] in outputs:
            continue
        users = consumers.get(elu.output[0], [])
        if len(users) != 1:
            continue
        pool = users[0]
        if pool.op_type != "MaxPool" or pool.domain not in ("", "ai.onnx") or pool.input[0] != elu.output[0]:
            continue
        if len([o for o in pool.output if o]) != 1:  # the Indices output would change meaning
            continue
        x, mid, y = elu.input[0], elu.output[0], pool.output[0]
        # Rewire: pool reads x and writes mid; elu reads mid and writes y. Node order: pool, then elu.
        pool.input[0] = x
        pool.output[0] = mid
        elu.input[0] = mid
        elu.output[0] = y
        i_elu = list(graph.node).index(elu)
        i_pool = list(graph.node).index(pool)
        pool_copy = type(pool)()
        pool_copy.CopyFrom(pool)
        elu_copy = type(elu)()
        elu_copy.CopyFrom(elu)
        graph.node[i_elu].CopyFrom(pool_copy)
        graph.node[i_pool].CopyFrom(elu_copy)
        swapped += 1
    if swapped:
        # The old intermediate's shape (pre-pool) is stale; drop value_info for renamed tensors.
        keep = [vi for vi in graph.value_info if vi.name not in _intermediates(graph)]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    detail = (f"{swapped} x Elu -> MaxPool reordered to MaxPool -> Elu (exact, ELU is monotonic)"
              if swapped else "no Elu -> MaxPool pair")
    return PassResult("elu-maxpool-swap", swapped, detail)


def _intermediates(graph) -> set[str]:
    return {o for n in graph.node if n.op_type in ("MaxPool", "Elu") for o in n.output}


# Every pass here is exact; a new one goes in only with a bit-equality test (tests/test_passes.py).
PASSES: dict[str, Callable] = {"elu-maxpool-swap": swap_elu_maxpool}


def optimize(model, names: list[str] | None = None) -> list[PassResult]:
    """Apply the exact passes (all by default) to ``model`` in place; return what each did."""
    results = []
    for name in names or list(PASSES):
        results.append(PASSES[name](model))
    return results
