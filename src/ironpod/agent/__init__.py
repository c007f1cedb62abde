"""The node agent: the hands of ironpod on one node (DESIGN.md, "Three roles").

It registers the node's capacity with the controller, heartbeats, and converges to the
assignment each heartbeat reply carries: starts the attempt's workers with the
torch.distributed environment, watches their exits, hangs and progress (beacons and log
lines), reports each event at once, and serves the workers' logs.

    main.py        run_agent(): register / heartbeat / converge loop; python -m ironpod.agent
    client.py      the wire protocol's three routes (httpx); the event sender
    supervisor.py  desired vs running attempt; stop and start; hang detection; workers.json
    worker.py      one worker process: environment, output pump, exit waiter
    progress.py    per-rank progress from beacons and log lines; the hang rule
    beacons.py     the Unix datagram socket the workers' beacons arrive on
    logs.py        per-rank log files and the HTTP server that serves them
    stacks.py      py-spy stack dumps of hung workers
    resources.py   CPUs, memory, GPUs (NVML, imported lazily)
"""

from ironpod.agent.main import main, run_agent

__all__ = ["main", "run_agent"]
