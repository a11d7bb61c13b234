"""Mixed precision under a hard budget: per-layer weight bits chosen without data.

``zsq quantize ... --budget wbits=3.5 --allocator sensitivity`` (or ``hessian``, ``constrained``,
``penalty``); ``zsq budget MODEL`` prints the cost model. In Python::

    from zsq.mixed import allocate
    allocation = allocate(teacher, image_shape=(3, 32, 32), budget="wbits=3.5", images=synthetic)
    student = quantize_model(teacher, allocation.apply(QuantSpec(wbits=4, abits=4)), (3, 32, 32))
"""

from zsq.mixed.allocate import (
    ALLOCATORS,
    DEFAULT_CHOICES,
    Allocation,
    MixedConfig,
    allocate,
    hessian_scores,
    read_bits,
    sensitivity_scores,
    write_bits,
)
from zsq.mixed.cost import Budget, LayerCost, cost_table, layer_costs, parse_budget
from zsq.mixed.search import SearchResult, differentiable_search
from zsq.mixed.solver import repair, solve_allocation

__all__ = [
    "ALLOCATORS",
    "DEFAULT_CHOICES",
    "Allocation",
    "Budget",
    "LayerCost",
    "MixedConfig",
    "SearchResult",
    "allocate",
    "cost_table",
    "differentiable_search",
    "hessian_scores",
    "layer_costs",
    "parse_budget",
    "read_bits",
    "repair",
    "sensitivity_scores",
    "solve_allocation",
    "write_bits",
]
