"""Network namespaces and veth links for the chaos layer.

Topology of one test (``Topology``), every name carrying this process's
pid so that parallel runs never collide and a crashed run's leftovers can
be recognised (``remove_stale``)::

    root namespace (test, SUT)         relay namespace          engine namespace e<i>
    d<i>s 10.B.2i.1  ---veth---  d<i>r  <-relay->  d<i>q  ---veth---  d<i>e 10.B.2i.2
    m<i>s 10.B.2i+1.1  ------------------- veth ------------------  m<i>e 10.B.2i+1.2

The data link (``d``) is the one kvsync follows the engine over; frames on
it cross the fault-injecting relay (``chaos.relay``), a userspace bridge
between two packet sockets. The management link (``m``) carries only the
simulator's control socket and never sees a fault, so that the test can
always ask an engine for its ground truth.

Offloads are switched off on the data links (``set_offloads``): a packet
socket sees what the driver sees, and with TSO/checksum offload that is
64 KiB super-frames with unfilled checksums that the relay could not
forward. With them off every frame is a real, MTU-sized, checksummed one,
so a dropped frame is exactly one lost TCP segment.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

PREFIX = "kvchaos"
NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
_SIOCETHTOOL = 0x8946
# ethtool "set" commands of the legacy ioctl interface (linux/ethtool.h).
_ETHTOOL_SET = {"tx": 0x17, "sg": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message names the command."""


def ip(*args: str, timeout: float = 10.0, check: bool = True) -> str:
    """Run ``ip ARGS`` with a deadline; its stdout."""
    try:
        res = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed") from None
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res.stdout


def why_not_available() -> str | None:
    """``None`` when this process can make namespaces and veths, else why not
    (the message a skipped test shows)."""
    if os.geteuid() != 0:
        return "chaos tests need root (CAP_NET_ADMIN) to create network namespaces"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    try:
        ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
    except NetnsError as e:
        return f"cannot create a veth pair: {e}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has entered namespace ``name``: what it
    opens (sockets, ioctls) belongs to that namespace. The thread ends with
    ``fn``, so this process's own namespace is never changed."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise NetnsError(f"setns into {name!r} failed: {os.strerror(e)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(30.0)
    if t.is_alive():
        raise NetnsError(f"operation in namespace {name!r} did not finish within 30 s")
    if err:
        raise err[0]
    return out[0]


def set_offloads(dev: str, on: bool) -> None:
    """Switch checksum/segmentation offloads of ``dev`` (in the calling
    thread's namespace) on or off, through the ethtool ioctl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # gso/gro/tso first: the kernel refuses some while tx is still needed.
        for feature in ("gro", "gso", "tso", "sg", "tx"):
            value = array.array("I", [_ETHTOOL_SET[feature], int(on)])
            ifr = struct.pack("16sP", dev.encode(), value.buffer_info()[0]) + bytes(16)
            try:
                fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifr)
            except OSError as e:
                raise NetnsError(f"cannot set {feature} offload of {dev!r}: {e}") from None


def _disable_ipv6() -> None:
    for scope in ("default", "all"):
        path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write("1")


def remove_stale() -> list[str]:
    """Delete namespaces left by chaos runs whose process is gone (a
    killed pytest never reaches its teardown); the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
                continue
            if os.path.exists(f"/proc/{parts[1]}"):
                continue
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def free_subnet() -> int:
    """A second octet B such that 10.B.0.0/16 is used by no route here."""
    routes = ip("-4", "route", "show", "table", "all")
    addrs = ip("-4", "addr")
    for _ in range(200):
        b = random.randrange(100, 250)
        if f"10.{b}." not in routes and f"10.{b}." not in addrs:
            return b
    raise NetnsError("no free 10.B.0.0/16 subnet found for the chaos links")


@dataclass
class Link:
    """The two links of engine ``i``: its data address (behind the relay)
    and its management address (direct)."""

    index: int
    netns: str
    data_ip: str
    sut_ip: str
    mgmt_ip: str
    relay_sut_dev: str
    relay_engine_dev: str


@dataclass
class Topology:
    """The namespaces and links of one test. ``close`` removes every one of
    them (deleting a namespace deletes the veths inside it, and with them
    their peers)."""

    engines: int
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{random.randrange(1 << 24):06x}")
    links: list[Link] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    root_devs: list[str] = field(default_factory=list)

    @property
    def relay_ns(self) -> str:
        return f"{PREFIX}-{self.tag}-relay"

    def _dev(self, kind: str, i: int, side: str) -> str:
        # Interface names are at most 15 bytes; the tag's random part keeps
        # them unique between concurrent tests of one process.
        return f"k{self.tag[-6:]}{kind}{i}{side}"

    def create(self) -> Topology:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        b = free_subnet()
        self._add_ns(self.relay_ns)
        for i in range(self.engines):
            ns = f"{PREFIX}-{self.tag}-e{i}"
            self._add_ns(ns)
            d_s, d_r, d_q, d_e = (self._dev("d", i, s) for s in "srqe")
            m_s, m_e = self._dev("m", i, "s"), self._dev("m", i, "e")
            data_net, mgmt_net = f"10.{b}.{2 * i}", f"10.{b}.{2 * i + 1}"
            # data: root <-> relay, relay <-> engine
            ip("link", "add", d_s, "type", "veth", "peer", "name", d_r, "netns", self.relay_ns)
            self.root_devs.append(d_s)
            ip("-n", ns, "link", "add", d_e, "type", "veth", "peer", "name", d_q)
            ip("-n", ns, "link", "set", d_q, "netns", self.relay_ns)
            # management: root <-> engine
            ip("link", "add", m_s, "type", "veth", "peer", "name", m_e, "netns", ns)
            self.root_devs.append(m_s)
            ip("addr", "add", f"{data_net}.1/24", "dev", d_s)
            ip("addr", "add", f"{mgmt_net}.1/24", "dev", m_s)
            ip("-n", ns, "addr", "add", f"{data_net}.2/24", "dev", d_e)
            ip("-n", ns, "addr", "add", f"{mgmt_net}.2/24", "dev", m_e)
            set_offloads(d_s, False)
            in_netns(ns, lambda dev=d_e: set_offloads(dev, False))  # type: ignore[misc]
            for dev in (d_s, m_s):
                ip("link", "set", dev, "up")
            for dev in (d_e, m_e, "lo"):
                ip("-n", ns, "link", "set", dev, "up")
            for dev in (d_r, d_q):
                ip("-n", self.relay_ns, "link", "set", dev, "up")
            self.links.append(
                Link(i, ns, f"{data_net}.2", f"{data_net}.1", f"{mgmt_net}.2", d_r, d_q)
            )

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        # No IPv6 autoconfiguration chatter on the links (/proc/sys/net is
        # the namespace of the thread that opens it).
        in_netns(name, _disable_ipv6)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        for dev in self.root_devs:  # gone with their peers; this is a safety net
            if os.path.exists(f"/sys/class/net/{dev}"):
                ip("link", "del", dev, check=False)
        self.namespaces.clear()
        self.root_devs.clear()
