"""The test cluster's own start survives a port taken between choosing it and binding it.

CI failed once on "bind: address already in use" (another node's outgoing route connection had
drawn the port), and the node processes already started leaked into the next test.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.nats_cluster import NatsCluster

pytestmark = pytest.mark.e2e


def test_a_port_taken_before_its_node_binds_it_starts_the_cluster_again_on_new_ports(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "nats")
    taken = cluster.nodes[2].cluster_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
        try:
            assert taken not in [n.cluster_port for n in cluster.nodes]  # the cluster moved
            assert (tmp_path / "nats" / "retry-1").is_dir()  # it did fail once, on that port
            assert all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes)
        finally:
            cluster.stop()
    assert all(n.proc is None for n in cluster.nodes)
