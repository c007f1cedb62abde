"""Several hosts on one machine: network namespaces joined by a bridge, made and removed here.

Each host is a namespace with one interface named ``eth0`` (a veth whose other end is on the
bridge in the root namespace) and an address in a private /24 that exists only inside this
machine. The bridge has ``.1``: the controller listens there. Cutting a host's network is
``ip link set <its bridge-side veth> down``, exactly what a failed NIC or switch port does.
Needs root; :func:`skip_reason` says why not when it cannot work.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ipt"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"{PREFIX}probe{os.getpid() % 10000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Hosts:
    """``n`` hosts; ``address(i)`` is host i's IP, ``exec(i, argv)`` runs argv inside it."""

    n: int
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    subnet: int = field(default_factory=lambda: random.randrange(20, 250))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{PREFIX}br{self.tag}"

    @property
    def gateway(self) -> str:
        return f"10.213.{self.subnet}.1"

    def namespace(self, i: int) -> str:
        return f"{PREFIX}{self.tag}h{i}"

    def veth(self, i: int) -> str:
        return f"{PREFIX}{self.tag}v{i}"

    def address(self, i: int) -> str:
        return f"10.213.{self.subnet}.{10 + i}"

    def create(self) -> Hosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, outer, inner = self.namespace(i), self.veth(i), f"{PREFIX}{self.tag}i{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
        return self

    def popen(self, i: int, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.namespace(i), *argv], **kwargs
        )
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def pids(self, i: int) -> list[int]:
        """Every process running inside host i."""
        out = _ip("netns", "pids", self.namespace(i), check=False).stdout
        return [int(pid) for pid in out.split()]

    def worker_pids(self, i: int, marker: str = "recipes.gpt.train") -> list[int]:
        """Processes inside host i whose command line contains ``marker``."""
        found = []
        for pid in self.pids(i):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(pid)
        return found

    def kill_all(self, i: int) -> list[int]:
        """SIGKILL every process inside host i at once: the machine died."""
        pids = self.pids(i)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        return pids

    def link(self, i: int, up: bool) -> None:
        _ip("link", "set", self.veth(i), "up" if up else "down")

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for i in range(self.n):
            # Anything still running inside (workers of a killed agent) dies with its namespace.
            self.kill_all(i)
            _ip("link", "del", self.veth(i), check=False)
            _ip("netns", "del", self.namespace(i), check=False)
        _ip("link", "del", self.bridge, check=False)


def remove_stale() -> None:
    """Remove namespaces and bridges left by a test run that was killed before cleaning up."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and "h" in name:
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}br"):
            _ip("link", "del", name, check=False)
