"""No import cycles anywhere in the project: within any package, no two modules or subpackages
import each other, directly or through others.  (import-linter, run by ``make lint``, checks the
layers between packages; this checks every package's insides, lazy imports included.)
Imports made only for type checking do not count: they never run."""

from __future__ import annotations

import itertools

import grimp
import pytest

PACKAGES = ("agent", "edge_contract", "edge_fleet")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)


def _siblings(graph: grimp.ImportGraph) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for module in graph.modules:
        if "." in module:
            found.setdefault(module.rsplit(".", 1)[0], []).append(module)
    return found


def test_no_two_siblings_import_each_other(graph: grimp.ImportGraph) -> None:
    cycles = [
        (a, b)
        for children in _siblings(graph).values()
        for a, b in itertools.combinations(sorted(children), 2)
        if graph.chain_exists(a, b, as_packages=True) and graph.chain_exists(b, a, as_packages=True)
    ]
    assert not cycles, [(graph.find_shortest_chain(a, b), graph.find_shortest_chain(b, a)) for a, b in cycles]


def test_the_graph_sees_lazy_imports(graph: grimp.ImportGraph) -> None:
    # Positive controls: a top-level and a function-level import are both in the graph.
    assert graph.direct_import_exists(importer="edge_fleet.cli", imported="edge_fleet.provision_cmd")
    assert graph.direct_import_exists(importer="edge_fleet.setup", imported="edge_fleet.retained")
    assert len(_siblings(graph)["edge_fleet"]) > 20
