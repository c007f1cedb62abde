"""Clusters ironpod starts itself: today the local one (:mod:`ironpod.cluster.local`).

A local cluster is the embedded default of DESIGN.md: one controller and N agents on this
machine, each agent a simulated node with its own share of the CPUs, its own work directory and
its own shared-memory area. The demo and the tests run on it; bare metal runs the same two
processes by hand (``ironpod controller``, ``ironpod agent``).
"""

from ironpod.cluster.local import ClusterError, ClusterInfo, down, read_cluster, up

__all__ = ["ClusterError", "ClusterInfo", "down", "read_cluster", "up"]
