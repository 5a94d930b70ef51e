"""An agent outbox that records everything the agent stores, to check it against what a
consumer received (tests/test_events_outage.py, bench/events_outage.py).

`recording_outbox` creates the outbox file with edgeagent's own `Outbox` before the agent
starts, and adds a trigger that copies each row the agent inserts to a `recorded` table,
in the same transaction. The agent accepts the file (the schema version and the `outbox`
table are its own) and deletes acknowledged rows as usual; `recorded` keeps them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from edgeagent.outbox import Outbox

# The agent only ever deletes from `outbox`, so `recorded` is everything it stored, in
# the order it stored it (rowid).
_RECORDER = """
CREATE TABLE recorded (created REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TRIGGER recorded AFTER INSERT ON outbox BEGIN
    INSERT INTO recorded VALUES (NEW.created, NEW.topic, NEW.payload);
END;
"""


@dataclass(frozen=True)
class Message:
    """A message the agent stored (`at`: the outbox row's `created`) or a consumer
    received (`at`: when)."""

    topic: str
    payload: bytes
    at: float


def recording_outbox(path: Path) -> Path:
    """Creates the agent's outbox at `path` and the trigger that records what it stores."""
    Outbox(path, max_bytes=1 << 20).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(_RECORDER)
    return path


def stored_messages(path: Path) -> list[Message]:
    """Every message the agent stored in the outbox at `path`, in order (readable while
    the agent runs)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        rows = conn.execute("SELECT created, topic, payload FROM recorded ORDER BY rowid")
        return [Message(topic, bytes(payload), created) for created, topic, payload in rows]


class _Published(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


M = TypeVar("M", bound=_Published)


def match(stored: list[Message], received: list[M]) -> tuple[list[M | None], list[M]]:
    """For each stored message, the first received copy of it (None: never received); and
    the received messages left over (duplicates, or anything the agent did not store).
    `received` is in arrival order. Messages carry no sequence number and two can be
    byte-identical (a stationary object's keep-alives), so this matches by topic and
    payload as a multiset."""
    copies: dict[tuple[str, bytes], deque[M]] = defaultdict(deque)
    for message in received:
        copies[(message.topic, message.payload)].append(message)
    firsts = [
        copies[(m.topic, m.payload)].popleft() if copies[(m.topic, m.payload)] else None
        for m in stored
    ]
    return firsts, [m for left in copies.values() for m in left]
