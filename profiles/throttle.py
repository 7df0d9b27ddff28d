"""A slower link, emulated on the client around a remote runner's calls.

Traffic shaping in the kernel (``tc netem`` in a network namespace) needs a
kernel with the netem qdisc; where there is none, this emulator gives a
loopback worker the link of a :class:`~diffsplit.profiles.link.LinkModel`: before
a remote call it holds the ``up`` lane for request bytes / up bandwidth, waits
half the round trip, makes the call, then holds the ``down`` lane for reply
bytes / down bandwidth and waits the other half. One transfer at a time each
way, first come first served: the lanes the simulator assumes.

The request size is worked out as the runner will send it (conditioning the
worker already holds travels as a digest); the reply size is the runner's own
count. Without a link (``link=None``) the emulator only records the calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from diffsplit.engine.executor import NodeCall
from diffsplit.engine.offload import RemoteRunner
from diffsplit.profiles.lanes import PriorityGate, Recorder
from diffsplit.profiles.link import LinkModel
from diffsplit.profiles.remote_model import HELD_INPUT_BYTES
from diffsplit.profiles.sizes import request_size


class LinkEmulator:
    """A node runner around a RemoteRunner that makes remote calls pay for ``link``."""

    def __init__(
        self, runner: RemoteRunner, link: LinkModel | None, recorder: Recorder | None = None
    ) -> None:
        self.runner = runner
        self.link = link
        self.recorder = recorder or Recorder()
        self._up = PriorityGate(1)
        self._down = PriorityGate(1)
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        node_id = call.node.id
        if node_id not in self.runner.assigned:
            return self.runner(call)
        if self.link is None:
            with self.recorder.segment("remote", node_id):
                return self.runner(call)
        size = request_size(call.node, call.node_class, call.inputs, self.runner.recipe_of)
        digests = [(i.digest, i.wire_bytes) for i in size.inputs if i.digest is not None]
        with self._lock:
            saved = sum(max(0, n - HELD_INPUT_BYTES) for digest, n in digests if digest in self._held)
        up_bytes = max(0, size.request_bytes - saved)
        self._transfer(self._up, "up", node_id, up_bytes, self.link.up_s(up_bytes))
        time.sleep(self.link.rtt_s / 2)
        with self.recorder.segment("remote", node_id):
            outputs = self.runner(call)
        stats = self.runner.stats.get(node_id)
        down_bytes = stats.reply_bytes if stats is not None else 0
        self._transfer(self._down, "down", node_id, down_bytes, self.link.down_s(down_bytes))
        time.sleep(self.link.rtt_s / 2)
        with self._lock:
            self._held.update(digest for digest, _ in digests)
        return outputs

    def _transfer(self, gate: PriorityGate, lane: str, node_id: str, nbytes: int, seconds: float) -> None:
        with gate.hold(time.monotonic()), self.recorder.segment(lane, node_id, nbytes):  # type: ignore[arg-type]
            time.sleep(seconds)
