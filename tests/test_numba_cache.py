"""The compiled kernels' on-disk cache must be safe to load into any process.

Numba names a compiled function after its qualified name, a per-process counter and its argument
types, and a cached library carries the functions it calls as weak symbols, which the process binds
to an earlier definition of the same name when it has one. Numba builds some of its NumPy support
in factories that make several different functions under one qualified name and the same argument
types (quicksort for sort and argsort, selection with and without NaN handling). A cache holding one
of those can bind, in a process that numbered another variant the same, to the wrong code: the swap
planner's cache, holding ``np.argsort``, crashed a fresh checkout's test run that way. So the cached
kernels carry none of them (they sort and select with their own radix passes)."""

from __future__ import annotations

import numba
import torch
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher

from conftest import random_batch
from seft_trl import SparsityEvolution, SparsityEvolutionConfig, numba_kernels, numba_topology

# Numba's factories that return a different function under the same name for each call.
VARIANT_FACTORIES = ("make_quicksort_impl", "make_mergesort_impl", "_select_factory", "_partition_factory")


def cached_dispatchers() -> dict[str, CPUDispatcher]:
    return {
        f"{module.__name__}.{name}": value
        for module in (numba_kernels, numba_topology)
        for name, value in vars(module).items()
        if isinstance(value, CPUDispatcher) and isinstance(value._cache, FunctionCache)
    }


def train_a_few_steps_with_updates(model: torch.nn.Module) -> None:
    """Every compiled path of a CPU run: the sampled δ gradient (density 0.01), selection, plans, counts."""
    engine = SparsityEvolution(model, SparsityEvolutionConfig(density=0.01, update_interval=4, accumulation_steps=2))
    optimizer = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    engine.attach(optimizer, total_steps=20)
    for step in range(8):
        ids = random_batch(batch=2, seqlen=32, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    numba_topology.stable_argsort(torch.rand(10))


def test_cached_kernels_link_no_function_that_shares_its_name_with_another(pruned_llama):
    train_a_few_steps_with_updates(pruned_llama)
    called = {name: dispatcher for name, dispatcher in cached_dispatchers().items() if dispatcher.signatures}
    assert {"seft_trl.numba_topology._plan_single_group", "seft_trl.numba_topology._candidates",
            "seft_trl.numba_kernels._sampled_gtx_add"} <= set(called)
    for name, dispatcher in called.items():
        # A fresh compile, since a library loaded from the cache cannot be inspected.
        options = {key: value for key, value in dispatcher.targetoptions.items() if key != "nopython"}
        fresh = numba.njit(**options)(dispatcher.py_func)
        for signature in dispatcher.signatures:
            fresh.compile(signature)
        for signature, llvm in fresh.inspect_llvm().items():
            defined = [line for line in llvm.splitlines() if line.startswith("define")]
            shared = [line for line in defined if any(factory in line for factory in VARIANT_FACTORIES)]
            assert not shared, f"{name}{signature} links {shared[0]}"
