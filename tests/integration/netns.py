"""Private hosts on one machine: a bridge plus one network namespace per host.

Each host gets a veth whose inner end is named `eth0` and an address on a private /24
behind the bridge, so processes started in it (`nsenter --net=<ns path>`) see a
distinct host address, as on a real cluster.

    net = BridgedHosts(["node1", "node2"]); net.up() ... net.down()

Needs root and iproute2. `down()` removes everything `up()` made, also after a
partial `up()`, and first kills whatever still runs inside the namespaces.
"""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 that no interface here uses yet."""
    used = _ip("-4", "-o", "addr").stdout
    start = os.getpid() % 250
    for k in range(250):
        prefix = f"10.213.{(start + k) % 250}."
        if f" {prefix}" not in used:
            return ipaddress.IPv4Network(prefix + "0/24")
    raise RuntimeError("no free private /24 for the test hosts")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class BridgedHosts:
    def __init__(self, hosts: list[str], tag: str | None = None):
        self.hosts = list(hosts)
        # Interface names are limited to 15 characters. The tag is the owner's pid, so
        # that leftovers of a killed owner can be recognised (remove_stale).
        self.tag = tag or str(os.getpid())
        self.bridge = f"slbr{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.addresses = {h: str(self.subnet.network_address + 2 + i) for i, h in enumerate(self.hosts)}
        self.namespaces = {h: f"slurm{self.tag}-{h}" for h in self.hosts}
        self._made: list[tuple[str, str]] = []  # (kind, name), undone in reverse

    @staticmethod
    def remove_stale() -> list[str]:
        """Deletes namespaces and bridges left by an owner that was killed before its
        teardown ran (e.g. SIGKILL on a test run); returns their names."""
        removed = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            m = re.match(r"slurm(\d+)-\S+", line)
            if m and not _alive(int(m.group(1))):
                for pid in _ip("netns", "pids", m.group(0), check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _ip("netns", "del", m.group(0), check=False)
                removed.append(m.group(0))
        for m in re.finditer(r"^\d+: (slbr(\d+))[:@]", _ip("-o", "link", check=False).stdout, re.M):
            if not _alive(int(m.group(2))):
                _ip("link", "del", m.group(1), check=False)
                removed.append(m.group(1))
        return removed

    def ns_path(self, host: str) -> str:
        return f"/run/netns/{self.namespaces[host]}"

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts):
            ns, veth = self.namespaces[host], f"slv{self.tag}-{i}"
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._made.append(("link", veth))
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            for args in (["addr", "add", f"{self.addresses[host]}/{self.subnet.prefixlen}", "dev", "eth0"],
                         ["link", "set", "lo", "up"], ["link", "set", "eth0", "up"],
                         ["route", "add", "default", "via", self.gateway]):
                _ip("-n", ns, *args)

    def pids(self, host: str) -> list[int]:
        out = _ip("netns", "pids", self.namespaces[host], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        """Ends every process still inside the namespaces (job steps left behind)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for h in self.hosts if ("netns", self.namespaces[h]) in self._made for p in self.pids(h)]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + timeout
            while pids and time.time() < deadline:
                pids = [p for p in pids if _alive(p)]
                time.sleep(0.2)
            if not pids:
                return

    def down(self) -> None:
        self.kill_all()
        errors = []
        for kind, name in reversed(self._made):
            # A veth goes away with its namespace; deleting it first is harmless.
            r = _ip("netns", "del", name, check=False) if kind == "netns" else _ip("link", "del", name, check=False)
            if r.returncode and "Cannot find" not in r.stderr and "No such" not in r.stderr:
                errors.append(r.stderr.strip())
        self._made.clear()
        if errors:
            raise RuntimeError("network teardown: " + "; ".join(errors))
