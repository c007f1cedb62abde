"""Cost of one progress beacon on the training thread, against its ~50 microsecond budget.

    python bench/beacon.py [--n 5000] [--interval-ms 0.5]

Measures :func:`ironpod.train.progress`'s sender in three set-ups, side by side in one run:
the datagram alone (an agent listening), the log line alone (to /dev/null), and both (what a
worker under an agent does). Reports the median and the 99th percentile per call: the tail is
what a training step would feel. Timings on a shared machine are noisy; compare the rows.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import socket
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from ironpod.train.beacon import BeaconSender

BUDGET_US = 50.0


def measure(sender: BeaconSender, n: int, interval_s: float) -> list[float]:
    """Time ``n`` sends, one every ``interval_s`` (a step rate faster than any real training)."""
    samples = []
    metrics = {"loss": 2.345678, "tok_s": 17500.0, "lr": 3e-4, "grad_norm": 0.91}
    for step in range(n):
        t0 = time.perf_counter_ns()
        sender.send(step, metrics)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        time.sleep(interval_s)
    return samples


def _agent(path: str, ready: multiprocessing.synchronize.Event) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    ready.set()
    while True:
        sock.recv(65536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="beacons per set-up")
    parser.add_argument(
        "--interval-ms", type=float, default=0.5, help="pause between beacons (a 'step')"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        path = os.path.join(tmp, "agent.sock")
        # The agent is another process, as in production, reading continuously: Linux queues
        # only net.unix.max_dgram_qlen (default 10) unread datagrams per socket, beyond which a
        # sender gets EAGAIN (counted as a drop).
        ready = multiprocessing.Event()
        agent = multiprocessing.Process(target=_agent, args=(path, ready), daemon=True)
        agent.start()
        ready.wait(10)
        setups = {
            "datagram only": BeaconSender(socket_path=path, rank=0, log=False),
            "log line only": BeaconSender(socket_path=None, rank=0, stream=devnull),
            "datagram + log line": BeaconSender(socket_path=path, rank=0, stream=devnull),
        }
        title = f"progress() cost per call: {args.n} calls, one per {args.interval_ms} ms"
        table = Table(title=f"{title} (budget {BUDGET_US} us)")
        for col in ("set-up", "median us", "p99 us", "max us", "dropped", "within budget (p99)"):
            table.add_column(col, justify="left" if col == "set-up" else "right")
        for name, sender in setups.items():
            samples = measure(sender, args.n, args.interval_ms / 1000)
            p99 = statistics.quantiles(samples, n=100)[98]
            table.add_row(
                name,
                f"{statistics.median(samples):.1f}",
                f"{p99:.1f}",
                f"{max(samples):.0f}",
                str(sender.dropped),
                "yes" if p99 <= BUDGET_US else "NO",
            )
            sender.close()
        agent.terminate()
        agent.join()
    Console().print(table)


if __name__ == "__main__":
    main()
