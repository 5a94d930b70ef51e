"""Fleet commands on `<prefix>/<device>/cmd/<name>` and `<prefix>/group/<group>/cmd/<name>`.

A request is a JSON object `{"id": "<request id>", "args": {...}}` (`args` optional). The
router replies on the request's MQTT 5 response topic, with its correlation data, when it
names one, otherwise on `<prefix>/<device>/reply`. Every reply is one JSON object:

    {"id": ..., "command": ..., "device": ..., "stage": ..., "ts": ...,
     "result": ... | "reason": ... | "progress": {"percent": ..., "message": ...}}

A short command answers with one terminal stage, `succeeded` or `failed`; a long one
answers `accepted`, any number of `progress`, then exactly one terminal stage. A request
that cannot run (not JSON, no id, unknown or refused command, bad args, too big, retained)
gets a `failed` reply with the reason (`"id": null` when it had no usable id) and changes
nothing.

Threads: `handle_message` runs on MqttLink's dispatch thread and only parses, checks and
queues. Handlers run on a pool of two threads (`edgeagent-cmd-worker_N`); at most
`MAX_PENDING` commands are queued or running, more are refused as busy.

Idempotency: a repeated request id, such as a QoS 1 redelivery, is not run again: the
requester gets the recorded terminal reply again, or `accepted` while it still runs. What is
remembered, and for how long, is `RequestLedger`'s contract (`edgeagent.commands.ledger`);
parsing and checking a request is `parse_request`'s (`edgeagent.commands.request`).

Binary results (snapshot JPEGs): a handler returns `BinaryResult(data, content_type)`.
The router publishes the bytes unchanged to `<reply topic>/<name>` (`name` defaults to the
command name: `.../reply/snapshot`), then the JSON `succeeded` reply, whose result says
where they went: `{"topic", "content_type", "bytes", "sha256", ...meta}`. With MQTT 5 the
binary message also carries the correlation data and a user property `id`. A sub-topic,
not the reply topic itself, because MQTT 3.1.1 has no content type: reply topics stay
JSON-only in both protocols. A requester asking for a snapshot also subscribes to
`<reply topic>/#`. A repeated id re-sends the JSON answer only, not the bytes (they are
not kept).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, overload

from pydantic import BaseModel, ValidationError

from edgeagent.commands.ledger import RequestLedger, SeenRequest
from edgeagent.commands.request import (
    CommandRejected,
    ReplyAddress,
    Request,
    parse_request,
    validation_reason,
)
from edgeagent.config import CommandsConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import reply_message
from edgeagent.mqtt.topics import Topics
from edgeagent.names import check_name

log = logging.getLogger(__name__)

MAX_PENDING: Final = 32
"""Commands queued or running at once; more are refused with a `busy` reason."""
WORKERS: Final = 2

Stage = Literal["accepted", "progress", "succeeded", "failed"]
ReplyPublisher = Callable[[str, bytes, dict[str, Any] | None], None]
"""Publishes one reply: (topic, payload, MQTT 5 properties or None); QoS 1, not retained."""

_WORKER_PREFIX = "edgeagent-cmd-worker"


@dataclass(frozen=True, slots=True)
class BinaryResult:
    """A result that is bytes (a JPEG snapshot): published raw to `<reply topic>/<name>`;
    `meta` (JSON values) is added to the `succeeded` result that points at it."""

    data: bytes
    content_type: str
    name: str | None = None  # the sub-topic; default: the command name
    meta: Mapping[str, Any] = field(default_factory=dict)


# --- running -----------------------------------------------------------------------------


ShortHandler = Callable[[Request], object]
LongHandler = Callable[[Request, "Progress"], object]


class Progress:
    """Reports `progress` stages of one long command; updates after its end are ignored."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._open = True

    def update(self, percent: float | None = None, message: str = "") -> None:
        """Publishes a `progress` reply: percent (0-100, clamped) done and what is going on."""
        shown: float | None = None
        if isinstance(percent, int | float) and math.isfinite(percent):
            shown = round(min(100.0, max(0.0, float(percent))), 1)
        with self._lock:
            if not self._open:
                return
            self._emit({"percent": shown, "message": str(message)[:500]})

    def close(self) -> None:
        with self._lock:
            self._open = False


@dataclass(frozen=True, slots=True)
class _Command:
    run: LongHandler
    long: bool
    schema: type[BaseModel] | None


def _ping(_request: Request) -> dict[str, Any]:
    return {"pong": True, "ts": round(time.time(), 3)}


class CommandRouter:
    """Parses, deduplicates and runs commands, and publishes their replies through
    `reply`. `handle_message` is MqttLink's `on_message`; it never blocks."""

    def __init__(
        self,
        topics: Topics,
        config: CommandsConfig,
        reply: ReplyPublisher,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topics = topics
        self._config = config
        self._reply = reply
        self._commands: dict[str, _Command] = {}
        self._lock = threading.Lock()
        self._ledger = RequestLedger(
            config.dedup_size, config.dedup_ttl_s, config.dedup_max_bytes, clock
        )
        self._pending = 0
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=WORKERS, thread_name_prefix=_WORKER_PREFIX
        )
        self.register("ping", _ping)

    # --- set-up --------------------------------------------------------------------------

    @overload
    def register(
        self,
        name: str,
        handler: ShortHandler,
        *,
        long: Literal[False] = False,
        schema: type[BaseModel] | None = None,
    ) -> None: ...

    @overload
    def register(
        self,
        name: str,
        handler: LongHandler,
        *,
        long: Literal[True],
        schema: type[BaseModel] | None = None,
    ) -> None: ...

    def register(
        self,
        name: str,
        handler: ShortHandler | LongHandler,
        *,
        long: bool = False,
        schema: type[BaseModel] | None = None,
    ) -> None:
        """Adds a command. A short handler gets the `Request`; a long one also a `Progress`.
        The return value (JSON values or a `BinaryResult`) becomes the `succeeded` result;
        an exception becomes `failed`. With `schema`, `args` must validate against it and
        the handler finds the model in `request.params`. Raises ValueError for a bad or
        repeated name."""
        check_name(name, "command name")
        if name in self._commands:
            raise ValueError(f"command {name!r} is registered already")
        if schema is not None and not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise ValueError(f"schema of command {name!r} must be a pydantic model class")
        if long:
            run = cast(LongHandler, handler)
        else:
            short = cast(ShortHandler, handler)

            def run(request: Request, _progress: Progress) -> object:
                return short(request)

        self._commands[name] = _Command(run, long, schema)

    @property
    def remembered(self) -> tuple[int, int]:
        """(ids, bytes) the repeat-id cache holds now; bytes stay within
        `commands.dedup_max_bytes`."""
        with self._lock:
            return self._ledger.usage()

    @property
    def commands(self) -> list[str]:
        """Registered command names (the allow-list may refuse some of them)."""
        return sorted(self._commands)

    def subscriptions(self) -> list[str]:
        """The topic filters to subscribe to (QoS 1): this device's and each group's."""
        filters = [self._topics.cmd_filter]
        filters += [self._topics.group_cmd_filter(g) for g in self._config.groups]
        return filters

    def close(self, timeout: float = 5.0) -> None:
        """Refuses new commands, fails the queued ones ("stopping") and waits up to `timeout`
        s for the running ones. Call it before the MQTT link stops: it sends replies."""
        with self._lock:
            self._closing = True
            futures = list(self._futures)
        self._pool.shutdown(wait=False)
        _, not_done = concurrent.futures.wait(futures, timeout)
        if not_done:
            log.warning("%d command(s) still running at stop", len(not_done))

    # --- receiving (the MQTT dispatch thread) --------------------------------------------

    def handle_message(self, topic: str, payload: bytes, properties: Mapping[str, Any]) -> None:
        """Takes one message from a command topic: replies `failed` at once to a bad one,
        otherwise queues it for a worker (or answers a repeated id from memory)."""
        try:
            request = parse_request(
                topic, payload, properties, self._topics, self._config, known=self._commands
            )
        except CommandRejected as rejected:
            log.warning("command on %s refused: %s", topic, rejected.reason)
            self._send(
                rejected.reply_to,
                self._message(
                    rejected.request_id, rejected.command, "failed", reason=rejected.reason
                ),
            )
            return
        self._accept(request)

    def _accept(self, request: Request) -> None:
        command = self._commands[request.name]
        refusal = "the agent is stopping"
        seen: SeenRequest | None = None
        with self._lock:
            earlier = self._ledger.get(request.id)
            if earlier is None and not self._closing:
                if self._pending >= MAX_PENDING:
                    refusal = f"busy: {self._pending} commands queued or running; retry later"
                else:
                    seen = self._ledger.add(request.id, request.name)
                    self._pending += 1
        if earlier is not None:
            self._repeat(request, earlier)
            return
        if seen is None:
            log.warning("command %s (id %r) refused: %s", request.name, request.id, refusal)
            self._send(request.reply_to, self._answer(request, "failed", reason=refusal))
            return

        if command.schema is not None:
            try:
                params = command.schema.model_validate(request.args)
            except ValidationError as exc:
                reason = validation_reason(request.name, exc)
                log.warning("command %s (id %r) refused: %s", request.name, request.id, reason)
                self._finish(
                    request, seen, "failed", self._answer(request, "failed", reason=reason)
                )
                return
            except Exception as exc:  # a validator of the schema itself is broken
                log.exception("the args schema of command %s raised", request.name)
                reason = f"invalid args for {request.name!r}: {type(exc).__name__}: {exc}"
                self._finish(
                    request, seen, "failed", self._answer(request, "failed", reason=reason)
                )
                return
            request = dataclasses.replace(request, params=params)

        if command.long:
            accepted = self._answer(request, "accepted")
            with self._lock:
                self._ledger.record_accepted(request.id, seen, accepted)
            self._send(request.reply_to, accepted)
        try:
            future = self._pool.submit(self._run, request, command, seen)
        except RuntimeError:  # close() shut the pool down meanwhile
            self._finish(request, seen, "failed", self._answer(request, "failed", reason=refusal))
            return
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _repeat(self, request: Request, seen: SeenRequest) -> None:
        if seen.name != request.name:
            reason = f"id {request.id!r} was already used for command {seen.name!r}"
            log.warning("command %s refused: %s", request.name, reason)
            self._send(request.reply_to, self._answer(request, "failed", reason=reason))
            return
        with self._lock:
            answer = seen.final or seen.accepted
            dropped = seen.dropped
        log.info("command %s (id %r) repeated: answering from memory", request.name, request.id)
        if dropped is not None:
            stage, size = dropped
            reason = (
                f"the {stage} reply to id {request.id!r} ({size} bytes) was too large to keep "
                "for repeats (commands.dedup_max_bytes); the command ran once and is not run "
                "again: send a new id to run it again"
            )
            answer = self._answer(request, "failed", reason=reason, original_stage=stage)
        self._send(request.reply_to, answer or self._answer(request, "accepted"))

    def _forget(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    # --- running (worker threads) --------------------------------------------------------

    def _run(self, request: Request, command: _Command, seen: SeenRequest) -> None:
        progress = Progress(
            lambda body: self._send(
                request.reply_to, self._answer(request, "progress", progress=body)
            )
        )
        outcome: tuple[Stage, bytes] | None = None
        try:
            outcome = self._outcome(request, command, progress)
        finally:
            progress.close()
            if outcome is None:  # a BaseException went through: still answer exactly once
                reason = "the command was aborted"
                self._finish(
                    request, seen, "failed", self._answer(request, "failed", reason=reason)
                )
            else:
                self._finish(request, seen, outcome[0], outcome[1])

    def _outcome(
        self, request: Request, command: _Command, progress: Progress
    ) -> tuple[Stage, bytes]:
        """Runs the handler; its terminal stage, `succeeded` or `failed`, and reply."""
        if self._closing:
            return "failed", self._answer(request, "failed", reason="the agent is stopping")
        started = time.monotonic()
        try:
            result = command.run(request, progress)
            progress.close()
            final = self._succeeded(request, result)
        except EdgeAgentError as exc:
            log.warning("command %s (id %r) failed: %s", request.name, request.id, exc)
            return "failed", self._answer(request, "failed", reason=str(exc))
        except Exception as exc:
            log.exception("command %s (id %r) raised", request.name, request.id)
            reason = f"{type(exc).__name__}: {exc}"
            return "failed", self._answer(request, "failed", reason=reason)
        log.info(
            "command %s (id %r) succeeded in %.3f s",
            request.name,
            request.id,
            time.monotonic() - started,
        )
        return "succeeded", final

    def _succeeded(self, request: Request, result: object) -> bytes:
        """The `succeeded` reply; publishes a BinaryResult's bytes first. Raises
        EdgeAgentError for a result that is not JSON."""
        if isinstance(result, BinaryResult):
            result = self._publish_binary(request, result)
        try:
            return self._answer(request, "succeeded", result=result)
        except (TypeError, ValueError) as exc:
            raise EdgeAgentError(f"the command's result is not JSON: {exc}") from exc

    def _publish_binary(self, request: Request, binary: BinaryResult) -> dict[str, Any]:
        name = binary.name or request.name
        check_name(name, "binary result name")
        topic = f"{request.reply_to.topic}/{name}"
        properties: dict[str, Any] | None = None
        if request.reply_to.correlation_data is not None:
            properties = {
                "correlation_data": request.reply_to.correlation_data,
                "content_type": binary.content_type,
                "user_properties": [("id", request.id)],
            }
        self._reply(topic, binary.data, properties)
        return {
            **binary.meta,
            "topic": topic,
            "content_type": binary.content_type,
            "bytes": len(binary.data),
            "sha256": hashlib.sha256(binary.data).hexdigest(),
        }

    def _finish(self, request: Request, seen: SeenRequest, stage: Stage, final: bytes) -> None:
        with self._lock:
            self._ledger.record_final(request.id, seen, stage, final)
            self._pending -= 1
        self._send(request.reply_to, final)

    # --- replies -------------------------------------------------------------------------

    def _answer(self, request: Request, stage: Stage, **body: Any) -> bytes:
        return self._message(request.id, request.name, stage, **body)

    def _message(
        self, request_id: str | None, command: str | None, stage: Stage, **body: Any
    ) -> bytes:
        """One reply as JSON bytes; raises TypeError/ValueError if `body` is not JSON."""
        return to_json(reply_message(request_id, command, self._topics.device_id, stage, **body))

    def _send(self, address: ReplyAddress, payload: bytes) -> None:
        try:
            self._reply(address.topic, payload, address.properties())
        except Exception:
            log.exception("cannot publish a command reply to %s", address.topic)
