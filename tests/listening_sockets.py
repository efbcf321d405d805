"""The sockets a process tree listens on, read from /proc (Linux): which process, which address, which port."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # the TCP state code of a listening socket in /proc/net/tcp
LOOPBACK = ("127.", "::1", "::ffff:127.")


@dataclass(frozen=True)
class ListeningSocket:
    pid: int
    process: str
    protocol: str
    address: str
    port: int

    @property
    def loopback_only(self) -> bool:
        return self.address.startswith(LOOPBACK)


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name may hold spaces and brackets
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def listening_sockets(root: int) -> list[ListeningSocket]:
    """Listening TCP sockets and bound UDP sockets of `root`'s process tree."""
    bound: dict[int, tuple[str, str, int]] = {}
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        table = Path(f"/proc/net/{protocol}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if protocol.startswith("tcp") and fields[3] != LISTEN:
                continue
            bound[int(fields[9])] = (protocol, *_address(fields[1]))
    found = []
    for pid in process_tree(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for inode in _socket_inodes(pid):
            if inode in bound:
                found.append(ListeningSocket(pid, name, *bound[inode]))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _address(text: str) -> tuple[str, int]:
    """'0100007F:1F90' -> ('127.0.0.1', 8080); the kernel writes each 32-bit word in host byte order."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)
