"""The request ids a `CommandRouter` has seen, and what it told their requesters.

Request ids are remembered (`dedup_size` of them, each for `dedup_ttl_s`, the oldest
forgotten first). A repeated id, such as a QoS 1 redelivery, is not run again: the
requester gets the recorded terminal reply again, or `accepted` while it still runs.
The recorded replies are bounded in bytes too (`dedup_max_bytes`, 1 MiB by default): a
terminal reply larger than a sixteenth of it is never kept whole, and when the kept
replies exceed it the oldest lose their bodies first; only after every body is gone are
the oldest ids forgotten. An id whose reply was not kept is still not run again: its
repeat gets a small `failed` reply that says so, names the first reply's stage
(`original_stage`) and asks for a new id.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

DEDUP_ENTRY_SHARE: Final = 16
"""A terminal reply larger than `dedup_max_bytes / DEDUP_ENTRY_SHARE` is not kept whole."""


@dataclass(slots=True)
class SeenRequest:
    """What the requester of one id has been told."""

    name: str
    first_seen: float  # the router's clock
    accepted: bytes | None = None
    final: bytes | None = None
    stage: str | None = None  # of the terminal reply
    # The terminal reply's stage and size when its body is not kept (too large, or given
    # up for the byte budget); the id itself is still remembered.
    dropped: tuple[str, int] | None = None
    cost: int = 0  # bytes the ledger counts for this entry


# The bytes one remembered id costs beyond its strings and replies: the dict slot, the
# SeenRequest object and the str/bytes headers (measured with sys.getsizeof, rounded up).
_ENTRY_OVERHEAD: Final = 256


class RequestLedger:
    """Request ids seen recently: at most `size`, each for `ttl` seconds, and their
    replies within `max_bytes`, oldest out first (see the module docstring). Not
    thread-safe: the router holds its lock."""

    def __init__(self, size: int, ttl: float, max_bytes: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self.entry_cap = max_bytes // DEDUP_ENTRY_SHARE
        self._clock = clock
        self._seen: collections.OrderedDict[str, SeenRequest] = collections.OrderedDict()
        # Ids whose terminal reply body is kept, oldest first: the first to give it up.
        self._bodies: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.bytes = 0

    def usage(self) -> tuple[int, int]:
        """(ids, bytes) remembered now."""
        self._expire()
        return len(self._seen), self.bytes

    def get(self, request_id: str) -> SeenRequest | None:
        self._expire()
        return self._seen.get(request_id)

    def add(self, request_id: str, name: str) -> SeenRequest:
        self._expire()
        seen = SeenRequest(name, self._clock())
        self._seen[request_id] = seen
        self._charge(request_id, seen)
        while len(self._seen) > self._size:
            self._pop_oldest()
        self._shrink()
        return seen

    def record_accepted(self, request_id: str, seen: SeenRequest, payload: bytes) -> None:
        seen.accepted = payload
        self._charge(request_id, seen)
        self._shrink()

    def record_final(self, request_id: str, seen: SeenRequest, stage: str, payload: bytes) -> None:
        """Keeps the terminal reply, or only its stage and size if it is too large."""
        seen.stage = stage
        if len(payload) > self.entry_cap:
            seen.final, seen.dropped = None, (stage, len(payload))
            log.info(
                "the %s reply to id %r (%d bytes) is too large to keep for repeats "
                "(commands.dedup_max_bytes / %d); a repeat gets a short answer",
                stage,
                request_id,
                len(payload),
                DEDUP_ENTRY_SHARE,
            )
        else:
            seen.final = payload
            if self._seen.get(request_id) is seen:
                self._bodies[request_id] = None
        self._charge(request_id, seen)
        self._shrink()

    def _charge(self, request_id: str, seen: SeenRequest) -> None:
        """Recounts `seen`'s bytes, if it is still remembered."""
        cost = _ENTRY_OVERHEAD + len(request_id) + len(seen.name)
        cost += len(seen.accepted or b"") + len(seen.final or b"")
        if self._seen.get(request_id) is seen:
            self.bytes += cost - seen.cost
        seen.cost = cost

    def _shrink(self) -> None:
        """Gives up the oldest reply bodies, then the oldest ids, until within budget."""
        while self.bytes > self._max_bytes and self._bodies:
            request_id, _ = self._bodies.popitem(last=False)
            seen = self._seen[request_id]
            if seen.final is not None:
                seen.dropped = (seen.stage or "terminal", len(seen.final))
                seen.final = None
                self._charge(request_id, seen)
        while self.bytes > self._max_bytes and len(self._seen) > 1:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        request_id, seen = self._seen.popitem(last=False)
        self._bodies.pop(request_id, None)
        self.bytes -= seen.cost

    def _expire(self) -> None:
        oldest = self._clock() - self._ttl
        while self._seen:
            first = next(iter(self._seen.values()))
            if first.first_seen > oldest:
                return
            self._pop_oldest()
