"""Parsing and checking one command request, before anything runs.

A request is a JSON object `{"id": "<request id>", "args": {...}}` (`args` optional) on a
command topic of this device or of one of its groups. `parse_request` returns a `Request`
or raises `CommandRejected`, and nothing else, with the reason the requester is told (not
JSON, no id, unknown or refused command, too big, retained); `reply_address` says where its
replies go, and `validation_reason` words refused `args`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from edgeagent.config import BUILTIN_COMMANDS, CommandsConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.mqtt.topics import Topics

log = logging.getLogger(__name__)

MAX_ID_LENGTH: Final = 128
_REQUEST_KEYS: Final = frozenset({"id", "args"})
_SHOWN_MAX = 64  # characters of a foreign string quoted in a reason
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


def validation_reason(name: str, exc: ValidationError) -> str:
    """Why the args of command `name` were refused, naming each bad argument; the words
    the router replies with and the control socket raises."""
    problems = [
        f"{'.'.join(str(p) for p in error['loc']) or 'args'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    ]
    return f"invalid args for {name!r}: " + "; ".join(problems)
