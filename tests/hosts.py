"""Several hosts on one machine: one network namespace per host, joined by a bridge.

Each host has its own loopback, address, hostname (`node0`, `node1`, …) and an /etc/hosts naming
every host, so ranks on different hosts can only meet over the bridge. The root namespace has no
address on the bridge: it reaches a host only through `Hosts.run`/`Hosts.popen`. A command on a host
runs in the host's network namespace and in mount and UTS namespaces of its own (its /etc/hosts
and hostname); /sys and cgroups stay the machine's, which slurmd needs.

`ssh` stands in for ssh (`ssh [-opts] HOST COMMAND…`), so launchers that start remote processes over
ssh (MPICH's hydra: `-launcher ssh -launcher-exec PATH`) start them on the named host.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

ENTER = """#!/bin/sh
# enter HOST COMMAND...: run COMMAND on HOST
case "$1" in
{cases}
  *) echo "no host named $1" >&2; exit 255 ;;
esac
shift
exec nsenter --net="/run/netns/$ns" unshare --mount --uts \\
    sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "{hosts}" "$host" "$@"
"""

SSH = """#!/bin/sh
# ssh [-options] HOST COMMAND...: COMMAND (one shell line, as ssh takes it) on HOST
while [ "${{1#-}}" != "$1" ]; do shift; done
host="$1"; shift
exec "{enter}" "$host" sh -c "$*"
"""

_serials = itertools.count()


class Hosts:
    """`with Hosts(2, directory) as hosts:` makes the hosts and the bridge, and removes them after."""

    def __init__(self, count: int, directory: Path):
        if shutil.which("nsenter") is None or shutil.which("unshare") is None or shutil.which("ip") is None:
            raise RuntimeError("needs ip (iproute2), nsenter and unshare (util-linux)")
        serial = next(_serials)
        tag = f"mn{os.getpid() % 100000}x{serial}"  # names and subnets unique to this test bed
        self.names = [f"node{i}" for i in range(count)]
        self.addresses = [f"10.{77 + serial % 100}.{os.getpid() % 250}.{i + 1}" for i in range(count)]
        self.namespaces = [f"{tag}-{name}" for name in self.names]
        self.links = [f"{tag}v{i}" for i in range(count)]  # the root-side end of each host's cable
        self.bridge = f"{tag}br"
        self.directory = directory
        self.enter = directory / "enter"
        self.ssh = directory / "ssh"

    def __enter__(self) -> Hosts:
        hosts = self.directory / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addresses, self.names)))
        cases = "\n".join(f"  {n}) ns={ns} host={n} ;;" for n, ns in zip(self.names, self.namespaces))
        self.enter.write_text(ENTER.format(cases=cases, hosts=hosts))
        self.ssh.write_text(SSH.format(enter=self.enter))
        for script in (self.enter, self.ssh):
            script.chmod(0o755)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for ns, link, address in zip(self.namespaces, self.links, self.addresses):
                _ip("netns", "add", ns)
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", link, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for host, ns in enumerate(self.namespaces):
            self.kill(host)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def command(self, host: int, argv: list[str]) -> list[str]:
        return [str(self.enter), self.names[host], *map(str, argv)]

    def popen(self, host: int, argv: list, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: int, argv: list, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), **kwargs)

    def cut(self, host: int) -> None:
        """Unplug a host: its processes live on, but nothing reaches it."""
        _ip("link", "set", self.links[host], "down")

    def kill(self, host: int) -> None:
        """Every process on a host, at once."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
