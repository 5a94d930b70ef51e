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

Idempotency: request ids are remembered (`dedup_size` of them, each for `dedup_ttl_s`,
the oldest forgotten first). A repeated id, such as a QoS 1 redelivery, is not run again:
the requester gets the recorded terminal reply again, or `accepted` while it still runs.
The recorded replies are bounded in bytes too (`dedup_max_bytes`, 1 MiB by default): a
terminal reply larger than a sixteenth of it is never kept whole, and when the kept
replies exceed it the oldest lose their bodies first; only after every body is gone are
the oldest ids forgotten. An id whose reply was not kept is still not run again: its
repeat gets a small `failed` reply that says so, names the first reply's stage
(`original_stage`) and asks for a new id.

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

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, cast, overload

from pydantic import BaseModel, ValidationError

from edgeagent.config import BUILTIN_COMMANDS, CommandsConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.mqtt.payload import to_json
from edgeagent.mqtt.protocol import reply_message
from edgeagent.mqtt.topics import Topics
from edgeagent.names import check_name

log = logging.getLogger(__name__)

MAX_ID_LENGTH: Final = 128
MAX_PENDING: Final = 32
"""Commands queued or running at once; more are refused with a `busy` reason."""
WORKERS: Final = 2
DEDUP_ENTRY_SHARE: Final = 16
"""A terminal reply larger than `dedup_max_bytes / DEDUP_ENTRY_SHARE` is not kept whole."""

Stage = Literal["accepted", "progress", "succeeded", "failed"]
ReplyPublisher = Callable[[str, bytes, dict[str, Any] | None], None]
"""Publishes one reply: (topic, payload, MQTT 5 properties or None); QoS 1, not retained."""

_REQUEST_KEYS: Final = frozenset({"id", "args"})
_SHOWN_MAX = 64  # characters of a foreign string quoted in a reason
_WORKER_PREFIX = "edgeagent-cmd-worker"
_MAX_TOPIC_BYTES = 65535

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """Where the replies to one request go."""

    topic: str
    correlation_data: bytes | None = None

    def properties(self) -> dict[str, Any] | None:
        """The MQTT 5 properties a reply carries: the correlation data, if any."""
        if self.correlation_data is None:
            return None
        return {"correlation_data": self.correlation_data}


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed, checked command request."""

    id: str
    name: str
    args: dict[str, Any]
    reply_to: ReplyAddress
    received_at: float  # Unix seconds
    topic: str
    group: str | None = None  # None: addressed to this device, else the group's name
    params: BaseModel | None = None  # `args` validated by the command's schema, if it has one

    def params_as(self, schema: type[M]) -> M:
        """`params` as the schema the command was registered with."""
        if not isinstance(self.params, schema):
            raise TypeError(f"command {self.name!r} was not registered with schema {schema}")
        return self.params


class CommandRejected(EdgeAgentError):  # noqa: N818 (a verdict on a request, not a fault)
    """A request that will not run; `reason` is sent back in a `failed` reply."""

    def __init__(
        self,
        reason: str,
        request_id: str | None,
        reply_to: ReplyAddress,
        command: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        self.reply_to = reply_to
        self.command = command


@dataclass(frozen=True, slots=True)
class BinaryResult:
    """A result that is bytes (a JPEG snapshot): published raw to `<reply topic>/<name>`;
    `meta` (JSON values) is added to the `succeeded` result that points at it."""

    data: bytes
    content_type: str
    name: str | None = None  # the sub-topic; default: the command name
    meta: Mapping[str, Any] = field(default_factory=dict)


# --- parsing -----------------------------------------------------------------------------


def _shown(value: str) -> str:
    """A foreign string quoted for a reason, cut short."""
    if len(value) > _SHOWN_MAX:
        return repr(value[:_SHOWN_MAX]) + "..."
    return repr(value)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _publishable(topic: str) -> bool:
    """True if `topic` can be published to (no wildcards, not a $-topic, fits MQTT)."""
    if not topic or topic.startswith("$") or any(c in topic for c in "+#\0"):
        return False
    try:
        return len(topic.encode("utf-8")) <= _MAX_TOPIC_BYTES
    except UnicodeEncodeError:
        return False


def reply_address(properties: Mapping[str, Any], topics: Topics) -> ReplyAddress:
    """The request's MQTT 5 response topic and correlation data, or the device's `reply`
    topic. A response topic under this device's command topics is not used: replying
    there would feed the reply back in as a command."""
    data = properties.get("correlation_data")
    correlation = bytes(data) if isinstance(data, bytes | bytearray) else None
    topic = properties.get("response_topic")
    if topic is None:
        return ReplyAddress(topics.reply, correlation)
    if isinstance(topic, str) and _publishable(topic) and topics.cmd_name(topic) is None:
        return ReplyAddress(topic, correlation)
    log.warning("ignoring unusable response topic %.80r; replying on %s", topic, topics.reply)
    return ReplyAddress(topics.reply, correlation)


def _addressed(topic: str, topics: Topics, config: CommandsConfig) -> tuple[str, str | None]:
    """(command name, group) of a command topic; ValueError naming why it is not one."""
    name = topics.cmd_name(topic)
    if name is None:
        raise ValueError(f"topic {_shown(topic)} is not a command topic")
    if topic.startswith(topics.cmd_filter[:-1]):
        return name, None
    for group in config.groups:
        if topic.startswith(topics.group_cmd_filter(group)[:-1]):
            return name, group
    raise ValueError(
        f"topic {_shown(topic)} is for a group this device is not in "
        f"(commands.groups: {', '.join(config.groups) or 'none'})"
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _valid_id(value: object) -> bool:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        return False
    try:
        value.encode("utf-8")  # a lone surrogate from a "\\ud800" escape is not text
    except UnicodeEncodeError:
        return False
    return True


def parse_request(
    topic: str,
    payload: bytes,
    properties: Mapping[str, Any],
    topics: Topics,
    config: CommandsConfig,
    *,
    known: Collection[str] = BUILTIN_COMMANDS,
    received_at: float | None = None,
) -> Request:
    """Parses and checks one command message; raises CommandRejected, and nothing else,
    with a reason for the requester. `known` are the commands that can run here."""
    reply_to = reply_address(properties, topics)
    try:
        name, group = _addressed(topic, topics, config)
    except ValueError as exc:
        raise CommandRejected(str(exc), None, reply_to) from None

    def reject(reason: str, request_id: str | None = None) -> CommandRejected:
        return CommandRejected(reason, request_id, reply_to, name)

    if properties.get("retain"):
        raise reject(
            "a retained command is refused: it would run again on every reconnect "
            "(publish commands with retain=false)"
        )
    if len(payload) > config.max_payload_bytes:
        raise reject(
            f"payload of {len(payload)} bytes exceeds the {config.max_payload_bytes}-byte limit"
        )
    try:
        document = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise reject(f"payload is not valid JSON: not UTF-8 text ({exc})") from None
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise reject(f"payload is not valid JSON: {detail}") from None
    if not isinstance(document, dict):
        raise reject(f"payload must be a JSON object, not {_json_type(document)}")
    if "id" not in document:
        raise reject(
            "'id' is missing: every request needs an id, a non-empty string of at most "
            f"{MAX_ID_LENGTH} characters"
        )
    request_id = document["id"]
    if not _valid_id(request_id):
        raise reject(f"'id' must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    unexpected = sorted(set(document) - _REQUEST_KEYS)
    if unexpected:
        shown = ", ".join(_shown(k) for k in unexpected[:5])
        raise reject(
            f"unexpected key(s) {shown}: a request has 'id' and optionally 'args'", request_id
        )
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise reject(f"'args' must be an object, not {_json_type(args)}", request_id)
    if name not in known:
        raise reject(
            f"unknown command {_shown(name)}; known: {', '.join(sorted(known))}", request_id
        )
    if config.allow is not None and name not in config.allow:
        raise reject(f"command {name!r} is not allowed on this device (allow-list)", request_id)
    return Request(
        id=request_id,
        name=name,
        args=args,
        reply_to=reply_to,
        received_at=time.time() if received_at is None else received_at,
        topic=topic,
        group=group,
    )


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


@dataclass(slots=True)
class _Seen:
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
# _Seen object and the str/bytes headers (measured with sys.getsizeof, rounded up).
_ENTRY_OVERHEAD: Final = 256


class _Ledger:
    """Request ids seen recently: at most `size`, each for `ttl` seconds, and their
    replies within `max_bytes`, oldest out first (see the module docstring). Not
    thread-safe: the router holds its lock."""

    def __init__(self, size: int, ttl: float, max_bytes: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self.entry_cap = max_bytes // DEDUP_ENTRY_SHARE
        self._clock = clock
        self._seen: collections.OrderedDict[str, _Seen] = collections.OrderedDict()
        # Ids whose terminal reply body is kept, oldest first: the first to give it up.
        self._bodies: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.bytes = 0

    def usage(self) -> tuple[int, int]:
        """(ids, bytes) remembered now."""
        self._expire()
        return len(self._seen), self.bytes

    def get(self, request_id: str) -> _Seen | None:
        self._expire()
        return self._seen.get(request_id)

    def add(self, request_id: str, name: str) -> _Seen:
        self._expire()
        seen = _Seen(name, self._clock())
        self._seen[request_id] = seen
        self._charge(request_id, seen)
        while len(self._seen) > self._size:
            self._pop_oldest()
        self._shrink()
        return seen

    def record_accepted(self, request_id: str, seen: _Seen, payload: bytes) -> None:
        seen.accepted = payload
        self._charge(request_id, seen)
        self._shrink()

    def record_final(self, request_id: str, seen: _Seen, stage: str, payload: bytes) -> None:
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

    def _charge(self, request_id: str, seen: _Seen) -> None:
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


def _ping(_request: Request) -> dict[str, Any]:
    return {"pong": True, "ts": round(time.time(), 3)}


def validation_reason(name: str, exc: ValidationError) -> str:
    """Why the args of command `name` were refused, naming each bad argument; the words
    the router replies with and the control socket raises."""
    problems = [
        f"{'.'.join(str(p) for p in error['loc']) or 'args'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    ]
    return f"invalid args for {name!r}: " + "; ".join(problems)


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
        self._ledger = _Ledger(config.dedup_size, config.dedup_ttl_s, config.dedup_max_bytes, clock)
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
        seen: _Seen | None = None
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

    def _repeat(self, request: Request, seen: _Seen) -> None:
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

    def _run(self, request: Request, command: _Command, seen: _Seen) -> None:
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

    def _finish(self, request: Request, seen: _Seen, stage: Stage, final: bytes) -> None:
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
