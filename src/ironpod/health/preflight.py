"""``python -m ironpod.health.preflight``: one node's part of an attempt's pre-flight check.

Before an attempt's workers start, the agent of every node runs this in a fresh process (a
process group must not outlive it in the agent): an all-reduce across the attempt's nodes, one
process each, on the attempt's master address and its own port; it prints the
:class:`~ironpod.health.CheckResult` as one JSON line. A fabric that cannot carry the job (a node
that cannot reach the others, a link far below its bandwidth) fails the attempt before any
training time is spent on it.
"""

from __future__ import annotations

import argparse
import sys

from ironpod.health.collective import pair_allreduce
from ironpod.health.core import Status, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ironpod.health.preflight", description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--size-bytes", type=int, default=16 * 2**20)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--min-busbw-gbps", type=float)
    args = p.parse_args(argv)
    try:
        row = pair_allreduce(
            args.rank,
            args.world,
            args.master_addr,
            args.master_port,
            args.backend,
            args.size_bytes,
            args.iters,
            args.timeout,
            min_busbw_gbps=args.min_busbw_gbps,
        )
    except Exception as exc:  # pair_allreduce never raises; this guards the import of torch
        row = result("collective.pair_allreduce", Status.FAIL, f"{type(exc).__name__}: {exc}")
    print(row.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
