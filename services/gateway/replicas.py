"""The inference replicas behind the gateway, and which one takes the next request.

Each replica is reached with the one asyncio client (TLS and the bearer token from the environment, as
every Wombat client). A background task polls every replica's GetLoad; `least-loaded` picks the replica
with the smallest (running + waiting) ÷ max_batch_size, counting the requests this gateway sent since the
last poll so that a burst between two polls spreads out; ties, and the `round-robin` policy, rotate.
A replica that answers UNAVAILABLE (loading, draining, gone) is skipped until a poll finds it again.

An upstream written `dns:///name:port` stands for every address the name resolves to, re-resolved every
`resolve_seconds`: on Kubernetes, a headless Service in front of the inference pods, so the gateway sees
(and balances over) each pod rather than one long-lived HTTP/2 connection that a ClusterIP would pin to
a single pod. TLS still verifies each pod's certificate by the Service's name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field

import grpc

from clients.base import ChannelSettings
from clients.inference import AsyncInferenceClient
from wombat.inference.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)
DNS_PREFIX = "dns:///"


class Balance(enum.Enum):
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


@dataclass
class Replica:
    address: str
    client: AsyncInferenceClient
    up: bool = False
    info: pb.ModelInfoResponse | None = None
    load: pb.GetLoadResponse | None = None
    sent_since_poll: int = 0  # requests this gateway started here since `load` was read
    in_flight: int = 0
    retired: bool = False  # its address no longer resolves: no new requests; closed once idle
    server_name: str | None = None  # the DNS name it was resolved from
    warned: bool = False  # its first failure to answer was logged
    upstream: str = ""  # the --upstream it came from: the metric label (pod IPs would be unbounded)

    def score(self) -> float:
        if self.load is None:
            return float(self.in_flight)
        busy = self.load.running_requests + self.load.waiting_requests + self.sent_since_poll
        return busy / max(1, self.load.max_batch_size)


@dataclass
class ReplicaPool:
    addresses: list[str]
    balance: Balance = Balance.LEAST_LOADED
    poll_seconds: float = 0.5
    call_timeout: float | None = 600.0
    resolve_seconds: float = 10.0
    replicas: list[Replica] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._turn = itertools.count()
        self._poller: asyncio.Task | None = None
        self._first_answer = asyncio.Event()
        self._resolved_at = -float("inf")

    async def start(self) -> None:
        """Opens the channels (inside the running loop) and starts polling."""
        await self._resolve()
        self._poller = asyncio.create_task(self._poll_forever())

    def _connect(self, address: str, upstream: str, server_name: str | None = None) -> Replica:
        settings = dataclasses.replace(ChannelSettings.from_env(address), server_name=server_name)
        client = AsyncInferenceClient(settings, timeout=self.call_timeout)
        return Replica(address, client, server_name=server_name, upstream=upstream)

    async def _resolve(self) -> None:
        """(Re)builds the replica list: plain addresses once, `dns:///` names into one replica per address."""
        self._resolved_at = time.monotonic()
        wanted: dict[str, str | None] = {}
        origin: dict[str, str] = {}
        for upstream in self.addresses:
            if not upstream.startswith(DNS_PREFIX):
                wanted[upstream], origin[upstream] = None, upstream
                continue
            host, _, port = upstream.removeprefix(DNS_PREFIX).rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:  # keep what it resolved to before
                log.warning("cannot resolve %s: %s", upstream, exc)
                wanted.update({r.address: host for r in self.replicas if r.server_name == host})
                origin.update({r.address: upstream for r in self.replicas if r.server_name == host})
                continue
            for family, _, _, _, sockaddr in infos:
                ip = sockaddr[0]
                address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
                wanted[address], origin[address] = host, upstream
        known = {r.address for r in self.replicas}
        for replica in self.replicas:
            replica.retired = replica.address not in wanted
        self.replicas += [
            self._connect(address, origin[address], host)
            for address, host in wanted.items()
            if address not in known
        ]
        for replica in [r for r in self.replicas if r.retired and r.in_flight == 0]:
            log.info("replica %s is gone from DNS", replica.address)
            self.replicas.remove(replica)
            await replica.client.close()

    async def wait_until_one_answers(self) -> pb.ModelInfoResponse:
        await self._first_answer.wait()
        return next(r.info for r in self.replicas if r.info is not None)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for replica in self.replicas:
            await replica.client.close()

    @property
    def replicas_up(self) -> int:
        """Replicas that answered the last poll (retired ones left out)."""
        return sum(r.up and not r.retired for r in self.replicas)

    @property
    def any_up(self) -> bool:
        return self.replicas_up > 0

    # The accounting of one request on a replica, kept here so that no caller touches the counters.

    def dispatched(self, replica: Replica) -> None:
        """A request was sent to `replica` (it counts towards its load until the next poll)."""
        replica.sent_since_poll += 1

    def refused(self, replica: Replica, code: grpc.StatusCode) -> None:
        """`replica` refused a request before producing anything; UNAVAILABLE marks it down until a poll."""
        if code is grpc.StatusCode.UNAVAILABLE:
            replica.up = False

    def started(self, replica: Replica) -> None:
        replica.in_flight += 1

    def finished(self, replica: Replica) -> None:
        replica.in_flight -= 1

    def candidates(self) -> list[Replica]:
        """Replicas to try for one request, best first; replicas last seen down come last (they may be
        back before the next poll)."""
        turn = next(self._turn)
        live = [r for r in self.replicas if not r.retired]
        n = len(live)
        rotated = [live[(turn + i) % n] for i in range(n)]
        if self.balance is Balance.LEAST_LOADED:
            rotated.sort(key=Replica.score)  # stable: equal scores keep the rotation
        return sorted(rotated, key=lambda r: not r.up)

    async def _poll_forever(self) -> None:
        while True:
            try:
                if time.monotonic() - self._resolved_at >= self.resolve_seconds:
                    await self._resolve()
                await asyncio.gather(*(self._poll(replica) for replica in list(self.replicas)))
            except Exception:  # a bug here must not silently stop every replica's load from updating
                log.exception("polling the replicas failed; retrying")
            await asyncio.sleep(self.poll_seconds)

    async def _poll(self, replica: Replica) -> None:
        timeout = max(1.0, self.poll_seconds * 2)
        try:
            if replica.info is None:
                replica.info = await replica.client.model_info(timeout)
            sent = replica.sent_since_poll
            replica.load = await replica.client.get_load(timeout)
            replica.sent_since_poll -= sent
            if not replica.up:
                log.info("replica %s is up (%s)", replica.address, replica.info.name)
            replica.up = True
            self._first_answer.set()
        except grpc.RpcError as exc:
            if replica.up or not replica.warned:
                log.warning(
                    "replica %s does not answer: %s %s", replica.address, exc.code().name, exc.details()
                )
                replica.warned = True
            replica.up, replica.load = False, None
