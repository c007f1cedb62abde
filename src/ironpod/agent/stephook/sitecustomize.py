"""ironpod's step hook, run at interpreter start-up in every Python worker the agent starts.

It imports nothing beyond ``os`` and ``sys`` and imports torch never: it adds a finder to
``sys.meta_path`` that waits for ``torch.optim.optimizer`` to be imported (``import torch``
does it) and, right after torch has run that module, registers the global optimizer step post
hook (``torch.optim.optimizer.register_optimizer_step_post_hook``). From then on each step
sends one datagram to the agent's socket (``IRONPOD_BEACON_SOCKET``)::

    {"rank": 0, "step": 41, "t": 1764650000.123456, "pid": 4242, "src": "hook", "step_s": 0.101}

``step`` counts steps since the process started, ``step_s`` is the wall time since the previous
one. At most one beacon goes out per ``MIN_SEND_S``: a tiny model's thousands of steps a second
would otherwise cost a datagram (and an agent wake-up) each and overflow the agent's queue; the
steps in between are counted in the next beacon's ``step``, so the agent's time per step stays
exact, and hang detection loses nothing (its smallest timeout is 1 s).

A pulse thread also sends ``{..., "busy": 1}`` every ``PULSE_S`` in which the process used CPU
(at least ``BUSY_CPU_SHARE`` of the interval): a process that is computing between steps (an
evaluation pass, a checkpoint, the teardown after the last step) is told apart from one that
is stopped or waits in a collective, which uses none. The agent gives a busy rank the
longer timeout (:mod:`ironpod.agent.progress`). At interpreter exit (``atexit``) it sends
``{..., "busy": 1, "exiting": 1}``: the teardown that follows (torch's, gloo's: seconds on a
loaded machine) is idle, and no hang either.

What counts as a step: an optimizer's ``step()`` opens a new step unless it is the first call
of a *different* optimizer since the current step opened. So one optimizer stepping once
an iteration counts once an iteration, and so do a GAN's two optimizers or one optimizer per
parameter group, each stepping once an iteration; an optimizer stepped several times an
iteration (a WGAN critic) counts each of those.

Rules it keeps:

- Sending never blocks: a non-blocking Unix datagram; a full queue or a missing agent drops it.
- Only the process that armed it sends: children forked later (DataLoader workers) inherit the
  hook and are told apart by their pid.
- A script that imports ``ironpod.train`` reports its own steps (real step numbers, the loss):
  the hook then sends no step beacons, so those numbers are the only ones the agent sees (the
  pulse still says when the process is busy).
- No exception of its own reaches the script: the hook turns itself off and says once, on
  stderr, why.
- A user's own ``sitecustomize`` later on ``sys.path`` (or in site-packages) still runs: this
  module finds it and runs it under the same name, as Python would have.
- ``IRONPOD_STEP_HOOK=0`` turns it off (the agent then does not put it on PYTHONPATH either).

The agent reads the beacons in :mod:`ironpod.agent.beacons` and :mod:`ironpod.agent.progress`.
"""

from __future__ import annotations

import os
import sys

# typing costs ~2 ms of start-up to import; mypy takes any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The names of ironpod.env, repeated: this module must not import ironpod (a test checks them).
SWITCH_ENV = "IRONPOD_STEP_HOOK"
SOCKET_ENV = "IRONPOD_BEACON_SOCKET"
RANK_ENV = "RANK"
#: The module whose loading arms the hook.
TARGET = "torch.optim.optimizer"
#: A process that has imported this reports its own progress: the hook stands down.
LIBRARY = "ironpod.train"
_OFF_VALUES = frozenset({"0", "false", "off", "no"})
#: The shortest time between two step beacons.
MIN_SEND_S = 0.05
#: Seconds between two looks at the process's CPU time, and the share of them that is "busy".
PULSE_S = 0.25
#: A rank waiting in a gloo or NCCL collective uses about none; one starved of CPU by a busy
#: machine still gets a few percent.
BUSY_CPU_SHARE = 0.02


def _say_off(why: str) -> None:
    try:
        sys.stderr.write(f"[ironpod] step beacon off: {why}\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not break the script either
        pass


class StepBeacon:
    """The global optimizer step post hook: counts steps, sends one beacon per step."""

    def __init__(self, socket_path: str, rank: int) -> None:
        import socket  # only once torch.optim is loading: start-up stays free
        import threading
        import time

        self.socket_path = socket_path
        self.rank = rank
        self.pid = os.getpid()
        self.steps = 0
        self.sent = 0
        self.dropped = 0
        self.off = False
        self._stepped: set[int] = set()  # ids of the optimizers that stepped in this step
        self._wall = time.time
        self._clock = time.perf_counter
        self._last: float | None = None
        self._last_sent = float("-inf")
        self._cpu = time.process_time
        self._sleep = time.sleep
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._pulse = threading.Thread(target=self._run_pulse, name="ironpod-pulse", daemon=True)

    def start_pulse(self) -> None:
        import atexit

        self._pulse.start()
        atexit.register(self.exiting)

    def exiting(self) -> None:
        """Say that this process is leaving (its teardown is not a hang)."""
        if self.off or os.getpid() != self.pid:
            return
        try:
            self._send(
                b'{"rank":%d,"step":%d,"t":%.6f,"pid":%d,"src":"hook","busy":1,"exiting":1}'
                % (self.rank, self.steps, self._wall(), self.pid)
            )
        except Exception as exc:
            _say_off(f"the exit beacon failed ({exc!r})")

    def _run_pulse(self) -> None:
        try:
            cpu = self._cpu()
            while not self.off and os.getpid() == self.pid:
                self._sleep(PULSE_S)
                now = self._cpu()
                if now - cpu >= BUSY_CPU_SHARE * PULSE_S:
                    self._send(
                        b'{"rank":%d,"step":%d,"t":%.6f,"pid":%d,"src":"hook","busy":1}'
                        % (self.rank, self.steps, self._wall(), self.pid)
                    )
                cpu = now
        except Exception as exc:
            _say_off(f"the pulse failed ({exc!r})")

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.socket_path)
            self.sent += 1
        except OSError:  # no agent, queue full, socket gone: drop, never wait
            self.dropped += 1

    def __call__(self, optimizer: object, args: object, kwargs: object) -> None:
        if self.off or os.getpid() != self.pid:
            return
        try:
            self._on_step(id(optimizer))
        except Exception as exc:
            self.off = True
            _say_off(f"the step hook failed ({exc!r})")

    def _on_step(self, key: int) -> None:
        if self._stepped and key not in self._stepped:
            self._stepped.add(key)  # another optimizer of the same step
            return
        self._stepped = {key}
        now = self._clock()
        step_s = now - self._last if self._last is not None else 0.0
        self._last = now
        self.steps += 1
        if now - self._last_sent < MIN_SEND_S or LIBRARY in sys.modules:
            return
        self._last_sent = now
        self._send(
            b'{"rank":%d,"step":%d,"t":%.6f,"pid":%d,"src":"hook","step_s":%.6f}'
            % (self.rank, self.steps, self._wall(), self.pid, step_s)
        )


class _ArmingLoader:
    """Wraps the loader of ``torch.optim.optimizer``: runs it, then arms the hook."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        arm(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... for tools
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` entry that answers for ``torch.optim.optimizer`` only, once."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        _remove_finder()
        try:
            spec = _find_with_others(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ArmingLoader(spec.loader)
            return spec
        except Exception as exc:
            _say_off(f"cannot wrap the loader of {TARGET} ({exc!r})")
            return None  # the normal finders try again


def _find_with_others(fullname: str, path: Any, target: Any) -> Any:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


_armed: list[StepBeacon] = []


def arm(optimizer_module: Any) -> StepBeacon | None:
    """Register the hook with ``optimizer_module`` (torch.optim.optimizer), once per process."""
    if _armed:
        return _armed[0]
    try:
        path = os.environ.get(SOCKET_ENV)
        if not path:
            return None
        beacon = StepBeacon(path, rank=int(os.environ.get(RANK_ENV) or 0))
        optimizer_module.register_optimizer_step_post_hook(beacon)
        beacon.start_pulse()
    except Exception as exc:
        _say_off(f"cannot register the optimizer step hook ({exc!r})")
        return None
    _armed.append(beacon)
    return beacon


def install() -> bool:
    """Wait for torch.optim (or arm now if it is loaded); False when off or nowhere to send."""
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in _OFF_VALUES:
        return False
    if not os.environ.get(SOCKET_ENV):
        return False
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        return arm(loaded) is not None
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True


def chain() -> None:
    """Run the ``sitecustomize`` that Python would have run without this one, if any."""
    import importlib.machinery  # frozen with the interpreter: cheap
    import importlib.util

    here = os.path.realpath(os.path.dirname(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    mine = sys.modules.get("sitecustomize")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # As a failed import would: gone from sys.modules; site.py reports the error.
        if mine is not None:
            sys.modules["sitecustomize"] = mine
        raise


if __name__ == "sitecustomize":
    try:
        install()
    except Exception as _exc:
        _say_off(f"cannot install the step hook ({_exc!r})")
    chain()
