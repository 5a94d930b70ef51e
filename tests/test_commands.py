"""Fleet commands: parsing and refusals, reply addressing, stages, idempotency, the
allow-list, args schemas, groups, binary results; a hypothesis fuzz of the parser; and
round trips through a real mosquitto with MQTT 5 and 3.1.1."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError, field_validator

from edgeagent.commands.request import CommandRejected, Request, parse_request
from edgeagent.commands.router import MAX_PENDING, BinaryResult, CommandRouter, Progress
from edgeagent.config import BUILTIN_COMMANDS, CommandsConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.mqtt import MqttLink, Topics
from tests.broker import Mosquitto, MqttReader, publish_once

DEVICE = "pi-cmd-01"
TOPICS = Topics("edgeagent", DEVICE)
V5_PROPS = {"response_topic": "dash/replies/7", "correlation_data": b"\x00corr"}
Reader = Callable[..., MqttReader]


class Replies:
    """The router's `reply` callable: records what would be published."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.sent: list[tuple[str, bytes, dict[str, Any] | None]] = []

    def __call__(self, topic: str, payload: bytes, properties: dict[str, Any] | None) -> None:
        with self._cond:
            self.sent.append((topic, payload, properties))
            self._cond.notify_all()

    def json(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.sent if not t.endswith("/snapshot")]

    def wait(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for m in self.json() if predicate(m)) >= count, timeout=5
            )
            assert ok, f"expected {count} matching replies, got {self.json()}"
        return [m for m in self.json() if predicate(m)]

    def terminal(self, request_id: str | None, count: int = 1) -> list[dict[str, Any]]:
        return self.wait(
            lambda m: m["id"] == request_id and m["stage"] in ("succeeded", "failed"), count
        )


class Spy:
    """A handler that counts its calls and can be held until released."""

    def __init__(self, result: object = None, *, hold: bool = False) -> None:
        self.calls: list[Request] = []
        self.threads: list[str] = []
        self.result = result
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, request: Request) -> object:
        self.calls.append(request)
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(5)
        return self.result


@pytest.fixture
def make_router() -> Iterator[Callable[..., tuple[CommandRouter, Replies]]]:
    routers: list[CommandRouter] = []

    def make(**config: Any) -> tuple[CommandRouter, Replies]:
        clock = config.pop("clock", time.monotonic)
        replies = Replies()
        router = CommandRouter(TOPICS, CommandsConfig(**config), replies, clock=clock)
        routers.append(router)
        return router, replies

    yield make
    for router in routers:
        router.close()


def request(request_id: object = "r1", **extra: Any) -> bytes:
    return json.dumps({"id": request_id, **extra}).encode()


# --- bad input -------------------------------------------------------------------------

BIG = b'{"id":"r1","args":{"x":"' + b"x" * 70_000 + b'"}}'


def cmd(name: str) -> str:
    return f"edgeagent/{DEVICE}/cmd/{name}"


BAD_INPUTS = [
    # (topic, payload, properties, the id in the reply, the reason it starts with)
    (cmd("status"), b"{not json", {}, None, "payload is not valid JSON: Expecting property"),
    (cmd("status"), b"\xff\xfe{}", {}, None, "payload is not valid JSON: not UTF-8 text"),
    (cmd("status"), b'{"id":"r1","args":{"x":NaN}}', {}, None, "payload is not valid JSON: NaN"),
    (cmd("status"), b"[" * 60_000, {}, None, "payload is not valid JSON: nested too deeply"),
    (cmd("status"), b"[1, 2]", {}, None, "payload must be a JSON object, not an array"),
    (cmd("status"), b'"ping"', {}, None, "payload must be a JSON object, not a string"),
    (cmd("status"), b'{"args": {}}', {}, None, "'id' is missing"),
    (cmd("status"), request(5), {}, None, "'id' must be a non-empty string of at most 128"),
    (cmd("status"), request(""), {}, None, "'id' must be a non-empty string of at most 128"),
    (cmd("status"), request("x" * 129), {}, None, "'id' must be a non-empty string of at most"),
    (cmd("status"), b'{"id":"\\ud800"}', {}, None, "'id' must be a non-empty string of at"),
    (cmd("status"), request(args=[1]), {}, "r1", "'args' must be an object, not an array"),
    (cmd("status"), request(args=None), {}, "r1", "'args' must be an object, not null"),
    (cmd("status"), request(arg={}), {}, "r1", "unexpected key(s) 'arg'"),
    (cmd("nope"), request(), {}, "r1", "unknown command 'nope'; known: ping, restart, status"),
    (cmd("a/b"), request(), {}, "r1", "unknown command 'a/b'; known: ping, restart, status"),
    (cmd("restart"), request(), {}, "r1", "command 'restart' is not allowed on this device"),
    (cmd("status"), BIG, {}, None, f"payload of {len(BIG)} bytes exceeds the 65536-byte limit"),
    (cmd("status"), request(), {"retain": True}, None, "a retained command is refused"),
    (
        "edgeagent/group/garage/cmd/status",
        request(),
        {},
        None,
        "topic 'edgeagent/group/garage/cmd/status' is for a group this device is not in",
    ),
    ("edgeagent/other/cmd/status", request(), {}, None, "topic 'edgeagent/other/cmd/status'"),
]


@pytest.mark.parametrize(("topic", "payload", "props", "expected_id", "reason"), BAD_INPUTS)
def test_bad_input_gets_a_failed_reply_and_runs_nothing(
    make_router: Any,
    topic: str,
    payload: bytes,
    props: dict[str, Any],
    expected_id: str | None,
    reason: str,
) -> None:
    config = {"allow": ("ping", "status"), "groups": ("kitchen",)}
    router, replies = make_router(**config)
    spy = Spy({"ok": True})
    router.register("status", spy)
    router.register("restart", spy)

    router.handle_message(topic, payload, props)

    [reply] = replies.terminal(expected_id)
    assert reply["stage"] == "failed"
    assert reply["reason"].startswith(reason), reply["reason"]
    assert reply["device"] == DEVICE
    assert [t for t, _, _ in replies.sent] == [TOPICS.reply]
    assert spy.calls == []
    with pytest.raises(CommandRejected) as caught:
        parse_request(
            topic, payload, props, TOPICS, CommandsConfig(**config), known=router.commands
        )
    assert caught.value.reason == reply["reason"]
    assert caught.value.request_id == expected_id


def test_a_handler_that_raises_fails_with_its_reason(
    make_router: Any, caplog: pytest.LogCaptureFixture
) -> None:
    router, replies = make_router()

    def refuses(_request: Request) -> object:
        raise EdgeAgentError("pipeline 'cam' is not running; start it first")

    def crashes(_request: Request) -> object:
        return {"ratio": 1 / 0}

    router.register("pipeline.stop", refuses)
    router.register("status", crashes)
    with caplog.at_level(logging.WARNING, "edgeagent.commands.router"):
        router.handle_message(TOPICS.cmd("pipeline.stop"), request("a"), {})
        router.handle_message(TOPICS.cmd("status"), request("b"), {})

        [refused] = replies.terminal("a")
        [crashed] = replies.terminal("b")
    assert refused["stage"] == "failed"
    assert refused["reason"] == "pipeline 'cam' is not running; start it first"
    assert crashed["stage"] == "failed"
    assert crashed["reason"] == "ZeroDivisionError: division by zero"
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert [r.exc_info[0] for r in tracebacks if r.exc_info] == [ZeroDivisionError]


def test_a_result_that_is_not_json_fails(make_router: Any) -> None:
    router, replies = make_router()
    router.register("status", Spy({"when": object()}))
    router.register("bench", Spy({"fps": float("nan")}))

    router.handle_message(TOPICS.cmd("status"), request("a"), {})
    router.handle_message(TOPICS.cmd("bench"), request("b"), {})

    for request_id in ("a", "b"):
        [reply] = replies.terminal(request_id)
        assert reply["stage"] == "failed"
        assert reply["reason"].startswith("the command's result is not JSON")


# --- addressing ------------------------------------------------------------------------


def test_replies_go_to_the_v5_response_topic_with_its_correlation_data(
    make_router: Any,
) -> None:
    router, replies = make_router()

    router.handle_message(TOPICS.cmd("ping"), request("v5"), V5_PROPS)
    router.handle_message(TOPICS.cmd("ping"), request("v311"), {})

    replies.terminal("v5")
    replies.terminal("v311")
    by_id = {json.loads(p)["id"]: (t, props) for t, p, props in replies.sent}
    assert by_id["v5"] == ("dash/replies/7", {"correlation_data": b"\x00corr"})
    assert by_id["v311"] == (TOPICS.reply, None)
    [pong] = [m for m in replies.json() if m["id"] == "v5"]
    assert pong["stage"] == "succeeded"
    assert pong["command"] == "ping"
    assert pong["result"]["pong"] is True
    assert abs(pong["result"]["ts"] - time.time()) < 5


@pytest.mark.parametrize(
    "response_topic", [TOPICS.cmd("ping"), "dash/+/x", "", "$SYS/x", 42, "a\0b"]
)
def test_an_unusable_response_topic_falls_back_to_reply(
    make_router: Any, response_topic: object
) -> None:
    router, replies = make_router()

    router.handle_message(TOPICS.cmd("ping"), request("x"), {"response_topic": response_topic})

    replies.terminal("x")
    assert [t for t, _, _ in replies.sent] == [TOPICS.reply]


def test_a_rejected_request_is_answered_on_its_response_topic(make_router: Any) -> None:
    router, replies = make_router()

    router.handle_message(TOPICS.cmd("ping"), b"{", V5_PROPS)

    [reply] = replies.terminal(None)
    assert reply["id"] is None
    assert reply["command"] == "ping"
    assert replies.sent[0][0] == "dash/replies/7"
    assert replies.sent[0][2] == {"correlation_data": b"\x00corr"}


# --- stages ----------------------------------------------------------------------------


def test_a_long_command_replies_accepted_progress_then_one_terminal_stage(
    make_router: Any,
) -> None:
    router, replies = make_router()
    kept: list[Progress] = []

    def bench(req: Request, progress: Progress) -> object:
        kept.append(progress)
        progress.update(0, "warming up")
        progress.update(50.04, "half way")
        progress.update(float("inf"), "unknown")
        progress.update(250, "clamped")
        return {"fps": 31.5, "args": req.args}

    router.register("bench", bench, long=True)
    router.handle_message(TOPICS.cmd("bench"), request("b1", args={"seconds": 1}), {})

    replies.terminal("b1")
    kept[0].update(99, "after the end")  # ignored: the command has ended
    stages = [m["stage"] for m in replies.json()]
    assert stages == ["accepted", "progress", "progress", "progress", "progress", "succeeded"]
    progress = [m["progress"] for m in replies.json() if m["stage"] == "progress"]
    assert progress == [
        {"percent": 0.0, "message": "warming up"},
        {"percent": 50.0, "message": "half way"},
        {"percent": None, "message": "unknown"},
        {"percent": 100.0, "message": "clamped"},
    ]
    assert replies.json()[-1]["result"] == {"fps": 31.5, "args": {"seconds": 1}}
    assert {m["id"] for m in replies.json()} == {"b1"}


def test_a_long_command_that_fails_ends_with_exactly_one_failed(make_router: Any) -> None:
    router, replies = make_router()

    def rollback(_req: Request, progress: Progress) -> object:
        progress.update(10, "checking the previous version")
        raise EdgeAgentError("no previous model version to roll back to")

    router.register("model.rollback", rollback, long=True)
    router.handle_message(TOPICS.cmd("model.rollback"), request("m1"), {})

    replies.terminal("m1")
    stages = [m["stage"] for m in replies.json()]
    assert stages == ["accepted", "progress", "failed"]
    assert replies.json()[-1]["reason"] == "no previous model version to roll back to"


def test_handlers_run_on_the_command_workers_not_the_caller(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"ok": True}, hold=True)
    router.register("status", spy)

    router.handle_message(TOPICS.cmd("status"), request("s"), {})  # returns while held

    assert spy.started.wait(5)
    assert replies.sent == []
    spy.release.set()
    replies.terminal("s")
    assert spy.threads[0].startswith("edgeagent-cmd-")


# --- idempotency -----------------------------------------------------------------------


def test_a_repeated_id_gets_the_first_answer_without_running_again(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"n": 1})
    router.register("status", spy)

    router.handle_message(TOPICS.cmd("status"), request("once"), {})
    [first] = replies.terminal("once")
    router.handle_message(TOPICS.cmd("status"), request("once"), {})
    replies.terminal("once", count=2)

    assert len(spy.calls) == 1
    assert replies.sent[0][1] == replies.sent[1][1]  # the same bytes, the same ts
    assert first["result"] == {"n": 1}


def test_a_repeated_id_while_running_gets_accepted_and_one_run(make_router: Any) -> None:
    router, replies = make_router()
    calls: list[str] = []
    release = threading.Event()

    def bench(req: Request, _progress: Progress) -> object:
        calls.append(req.id)
        assert release.wait(5)
        return {"done": True}

    router.register("bench", bench, long=True)
    router.handle_message(TOPICS.cmd("bench"), request("slow"), {})
    router.handle_message(TOPICS.cmd("bench"), request("slow"), {})
    replies.wait(lambda m: m["stage"] == "accepted", count=2)
    release.set()
    replies.terminal("slow")
    router.handle_message(TOPICS.cmd("bench"), request("slow"), {})
    replies.terminal("slow", count=2)

    assert calls == ["slow"]
    stages = [m["stage"] for m in replies.json()]
    assert stages == ["accepted", "accepted", "succeeded", "succeeded"]
    assert replies.sent[0][1] == replies.sent[1][1]


def test_ids_are_forgotten_after_the_ttl_and_beyond_the_size(make_router: Any) -> None:
    now = [1000.0]
    router, replies = make_router(dedup_ttl_s=60, dedup_size=2, clock=lambda: now[0])
    spy = Spy({"ok": True})
    router.register("status", spy)

    def send(request_id: str, count: int) -> None:
        router.handle_message(TOPICS.cmd("status"), request(request_id), {})
        replies.terminal(request_id, count)

    send("a", 1)
    now[0] += 59
    send("a", 2)  # remembered
    assert len(spy.calls) == 1
    now[0] += 2
    send("a", 3)  # forgotten after 60 s: runs again
    assert len(spy.calls) == 2
    send("b", 1)
    send("c", 1)  # only two ids are kept: "a" drops out
    send("a", 4)
    assert [r.id for r in spy.calls] == ["a", "a", "b", "c", "a"]


class Lines:
    """A `logs`-like handler whose reply is about `size` bytes; counts its calls."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls: list[str] = []

    def __call__(self, request: Request) -> object:
        self.calls.append(request.id)
        return {"lines": ["x" * 99] * (self.size // 100)}


def test_a_reply_too_large_to_keep_is_not_run_again_and_its_repeat_says_so(
    make_router: Any,
) -> None:
    router, replies = make_router(dedup_max_bytes=64 * 1024)  # keeps replies up to 4 KiB
    logs = Lines(20_000)
    router.register("logs", logs)

    router.handle_message(TOPICS.cmd("logs"), request("big"), {})
    [first] = replies.terminal("big")
    assert first["stage"] == "succeeded"
    assert len(first["result"]["lines"]) == 200
    router.handle_message(TOPICS.cmd("logs"), request("big"), {})

    [_, repeat] = replies.terminal("big", count=2)
    assert logs.calls == ["big"], "the command ran once"
    assert repeat["stage"] == "failed"
    assert repeat["original_stage"] == "succeeded"
    assert "too large to keep" in repeat["reason"]
    assert "send a new id" in repeat["reason"]
    assert router.remembered[1] < 4 * 1024, "only the id is kept, not the 20 KB reply"


def test_the_repeat_cache_gives_up_the_oldest_replies_first_and_stays_within_its_bytes(
    make_router: Any,
) -> None:
    now = [1000.0]
    budget = 64 * 1024
    router, replies = make_router(dedup_max_bytes=budget, clock=lambda: now[0])
    logs = Lines(3_000)  # under the 4 KiB a reply may have: each is kept, at first
    router.register("logs", logs)

    for i in range(100):  # 300 KB of replies into a 64 KiB budget
        router.handle_message(TOPICS.cmd("logs"), request(f"r{i}"), {})
        replies.terminal(f"r{i}")
        assert router.remembered[1] <= budget
    assert router.remembered[0] == 100, "every id is still remembered"

    for request_id in ("r0", "r99"):
        router.handle_message(TOPICS.cmd("logs"), request(request_id), {})
    old, recent = replies.terminal("r0", count=2)[1], replies.terminal("r99", count=2)[1]
    assert len(logs.calls) == 100, "no repeat ran again"
    assert old["stage"] == "failed", "the oldest reply was given up for the budget"
    assert old["original_stage"] == "succeeded"
    assert recent == replies.terminal("r99")[0], "the newest is answered in full"

    now[0] += 3601  # dedup_ttl_s
    assert router.remembered == (0, 0)


def test_many_large_replies_do_not_grow_memory_beyond_the_budget() -> None:
    """1,000 replies of 100 KB (the issue's 147 KB `logs` replies, scaled): without a byte
    bound the cache alone would hold 100 MB; measured with tracemalloc."""
    sent = [0]

    def discard(_topic: str, payload: bytes, _properties: dict[str, Any] | None) -> None:
        sent[0] += len(payload)

    router = CommandRouter(TOPICS, CommandsConfig(), discard)  # the default 1 MiB budget
    logs = Lines(100_000)
    router.register("logs", logs)
    try:
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            router.handle_message(TOPICS.cmd("logs"), request(f"r{i}"), {})
            deadline = time.monotonic() + 10
            while len(logs.calls) < i + 1:
                assert time.monotonic() < deadline
                time.sleep(0.001)
        router.close()  # waits for the last replies
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
        router.close()
    assert sent[0] > 100_000_000, "every reply was sent"
    assert grown < 4 * 1024 * 1024, f"memory grew by {grown} bytes"
    ids, held = router.remembered
    assert ids == 1000
    assert held <= 1024 * 1024


def test_an_id_reused_for_another_command_is_refused(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"ok": True})
    router.register("status", spy)

    router.handle_message(TOPICS.cmd("ping"), request("same"), {})
    replies.terminal("same")
    router.handle_message(TOPICS.cmd("status"), request("same"), {})

    [_, refused] = replies.terminal("same", count=2)
    assert refused["stage"] == "failed"
    assert refused["reason"] == "id 'same' was already used for command 'ping'"
    assert spy.calls == []


# --- configuration, schemas, groups, limits --------------------------------------------


def test_the_allow_list_names_known_commands_only() -> None:
    assert CommandsConfig(allow=("ping", "snapshot")).allow == ("ping", "snapshot")
    with pytest.raises(ValidationError, match="unknown command\\(s\\) pign; known: bench"):
        CommandsConfig(allow=("pign",))
    with pytest.raises(ValidationError, match="group name 'a/b'"):
        CommandsConfig(groups=("a/b",))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CommandsConfig.model_validate({"allowed": ["ping"]})
    assert "ping" in BUILTIN_COMMANDS


def test_an_empty_allow_list_refuses_even_ping(make_router: Any) -> None:
    router, replies = make_router(allow=())

    router.handle_message(TOPICS.cmd("ping"), request("p"), {})

    [reply] = replies.terminal("p")
    assert reply["reason"] == "command 'ping' is not allowed on this device (allow-list)"


class BenchArgs(BaseModel):
    seconds: int = Field(ge=1, le=60)
    pipeline: str


def test_args_are_validated_by_the_schema(make_router: Any) -> None:
    router, replies = make_router()
    got: list[BenchArgs] = []

    def bench(req: Request) -> object:
        got.append(req.params_as(BenchArgs))
        return {"ok": True}

    router.register("bench", bench, schema=BenchArgs)
    router.handle_message(
        TOPICS.cmd("bench"), request("bad", args={"seconds": "x", "pipelin": "cam"}), {}
    )
    router.handle_message(
        TOPICS.cmd("bench"), request("good", args={"seconds": 5, "pipeline": "cam"}), {}
    )

    [bad] = replies.terminal("bad")
    [good] = replies.terminal("good")
    assert bad["stage"] == "failed"
    assert bad["reason"].startswith("invalid args for 'bench': seconds: Input should be a valid")
    assert "pipeline: Field required" in bad["reason"]
    assert good["stage"] == "succeeded"
    assert got == [BenchArgs(seconds=5, pipeline="cam")]


class BrokenArgs(BaseModel):
    seconds: int

    @field_validator("seconds")
    @classmethod
    def _broken(cls, value: int) -> int:
        raise TypeError("a bug in the validator")


def test_a_broken_schema_fails_the_command_not_the_router(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"ok": True})
    router.register("bench", spy, schema=BrokenArgs)

    router.handle_message(TOPICS.cmd("bench"), request("b", args={"seconds": 1}), {})
    router.handle_message(TOPICS.cmd("ping"), request("p"), {})

    [failed] = replies.terminal("b")
    assert failed["reason"] == "invalid args for 'bench': TypeError: a bug in the validator"
    assert replies.terminal("p")[0]["stage"] == "succeeded"
    assert spy.calls == []


def test_registration_rejects_bad_and_repeated_names(make_router: Any) -> None:
    router, _ = make_router()
    with pytest.raises(ValueError, match="registered already"):
        router.register("ping", Spy())
    with pytest.raises(ValueError, match="command name 'a/b'"):
        router.register("a/b", Spy())


def test_group_commands_run_and_groups_are_subscribed(make_router: Any) -> None:
    router, replies = make_router(groups=("kitchen", "floor-2"))
    spy = Spy({"ok": True})
    router.register("status", spy)

    router.handle_message(TOPICS.group_cmd("kitchen", "status"), request("g1"), {})

    [reply] = replies.terminal("g1")
    assert reply["stage"] == "succeeded"
    assert spy.calls[0].group == "kitchen"
    assert router.subscriptions() == [
        "edgeagent/pi-cmd-01/cmd/#",
        "edgeagent/group/kitchen/cmd/#",
        "edgeagent/group/floor-2/cmd/#",
    ]


def test_too_many_pending_commands_are_refused_as_busy(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"ok": True}, hold=True)
    router.register("status", spy)

    for i in range(MAX_PENDING + 1):
        router.handle_message(TOPICS.cmd("status"), request(f"q{i}"), {})

    [busy] = replies.terminal(f"q{MAX_PENDING}")
    assert busy["reason"].startswith(f"busy: {MAX_PENDING} commands queued or running")
    spy.release.set()
    for i in range(MAX_PENDING):
        assert replies.terminal(f"q{i}")[0]["stage"] == "succeeded"
    assert len(spy.calls) == MAX_PENDING


def test_close_fails_queued_commands_and_refuses_new_ones(make_router: Any) -> None:
    router, replies = make_router()
    spy = Spy({"ok": True}, hold=True)
    router.register("status", spy)
    for i in range(4):
        router.handle_message(TOPICS.cmd("status"), request(f"c{i}"), {})
    assert spy.started.wait(5)

    closer = threading.Thread(target=router.close, name="test-closer")
    closer.start()
    router.handle_message(TOPICS.cmd("status"), request("late"), {})
    spy.release.set()
    closer.join(5)

    outcome = {i: replies.terminal(f"c{i}")[0]["stage"] for i in range(4)}
    assert sorted(outcome.values()) == ["failed", "failed", "succeeded", "succeeded"]
    assert replies.terminal("late")[0]["reason"] == "the agent is stopping"
    assert len(spy.calls) == 2  # the two running ones; the queued ones never ran


def test_a_binary_result_goes_raw_to_a_reply_subtopic(make_router: Any) -> None:
    router, replies = make_router()
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    router.register(
        "snapshot", Spy(BinaryResult(jpeg, "image/jpeg", meta={"width": 64, "height": 48}))
    )

    router.handle_message(TOPICS.cmd("snapshot"), request("s1"), V5_PROPS)
    router.handle_message(TOPICS.cmd("snapshot"), request("s2"), {})

    [v5] = replies.terminal("s1")
    [v311] = replies.terminal("s2")
    binaries = [(t, p, props) for t, p, props in replies.sent if t.endswith("/snapshot")]
    assert binaries == [
        (
            "dash/replies/7/snapshot",
            jpeg,
            {
                "correlation_data": b"\x00corr",
                "content_type": "image/jpeg",
                "user_properties": [("id", "s1")],
            },
        ),
        (TOPICS.reply + "/snapshot", jpeg, None),
    ]
    assert v5["result"] == {
        "width": 64,
        "height": 48,
        "topic": "dash/replies/7/snapshot",
        "content_type": "image/jpeg",
        "bytes": len(jpeg),
        "sha256": hashlib.sha256(jpeg).hexdigest(),
    }
    assert v311["result"]["topic"] == TOPICS.reply + "/snapshot"


def test_a_reply_that_cannot_be_published_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(topic: str, payload: bytes, properties: dict[str, Any] | None) -> None:
        raise RuntimeError("MqttLink.publish() called after stop()")

    router = CommandRouter(TOPICS, CommandsConfig(), broken)
    try:
        router.handle_message(TOPICS.cmd("ping"), b"{", {})
    finally:
        router.close()
    assert "cannot publish a command reply" in caplog.text


# --- fuzzing the parser ----------------------------------------------------------------

# Cheap strategies: 10,000 examples must stay well under 20 s on a loaded 2-core box.
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
_ids = st.one_of(
    st.sampled_from(["r1", "", "x" * 128, "x" * 129, "\u00e9\u20ac", "\ud800", "a/b#+"]),
    st.text(max_size=8),
    _leaf,
    st.lists(_leaf, max_size=2),
)
_ODD_ARGS: list[object] = [{}, [], None, "x", 1.5, {"a": [1, {"b": None}]}]
_args = st.one_of(
    st.sampled_from(_ODD_ARGS),
    st.dictionaries(st.sampled_from(["seconds", "pipeline", "", "\x00"]), _leaf, max_size=2),
    st.lists(_leaf, max_size=2),
)
_requestish = st.one_of(
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8)}, optional={"args": _args}),
    st.fixed_dictionaries({}, optional={"id": _ids, "args": _args, "extra": _leaf}),
)
_TEMPLATES = [
    b'{"id":"r1","args":{"seconds":5,"pipeline":"cam"}}',
    b'{"id":"r1"}',
    b'[{"id":"r1"}]',
    b'{"args":{},"id":"x"}',
]
_spliced = st.tuples(st.sampled_from(_TEMPLATES), st.binary(max_size=8), st.integers(0, 50)).map(
    lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
)
_payloads = st.one_of(
    st.binary(max_size=64),
    _spliced,  # nearly valid JSON, broken at a random place
    _requestish.map(lambda d: json.dumps(d).encode()),
    _leaf.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"NaN", b"[" * 5000, b'{"id":"\\udfff"}', b"\x00", b"{" * 10, b"x" * 600]),
)
_NAMES = [*sorted(BUILTIN_COMMANDS), "", "nope", "a/b", "\u00e9", "ping/", "+", "#"]
_ALLOWED = ["ping", "status", "config.get", "snapshot"]
_topics = st.one_of(
    st.sampled_from(_ALLOWED).map(lambda n: f"edgeagent/{DEVICE}/cmd/{n}"),
    st.sampled_from(_ALLOWED).map(lambda n: f"edgeagent/group/kitchen/cmd/{n}"),
    st.sampled_from(_NAMES).map(lambda n: f"edgeagent/{DEVICE}/cmd/{n}"),
    st.sampled_from(
        [
            "",
            "edgeagent",
            f"edgeagent/{DEVICE}/reply",
            "edgeagent/group/cmd/x",
            "edgeagent/group/garage/cmd/ping",
            "edgeagent/group//cmd/ping",
            "edgeagent/group/a/b/cmd/ping",
        ]
    ),
    st.text(max_size=12),
)
_properties = st.sampled_from(
    [
        {},
        {"retain": False},
        {"retain": True},
        {"response_topic": "dash/r/1", "correlation_data": b"\x00\xff"},
        {"response_topic": "dash/r/1", "correlation_data": "text, not bytes"},
        {"response_topic": "dash/+/1"},
        {"response_topic": ""},
        {"response_topic": None, "correlation_data": b"c"},
        {"response_topic": 42},
        {"response_topic": f"edgeagent/{DEVICE}/cmd/ping"},
        {"response_topic": "x" * 70_000},
        {"correlation_data": b"orphan", "content_type": "application/json"},
    ]
)
_FUZZ_CONFIG = CommandsConfig(allow=tuple(_ALLOWED), groups=("kitchen",), max_payload_bytes=512)


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(topic=_topics, payload=_payloads, properties=_properties)
def test_fuzz_parse_request_only_ever_rejects(
    topic: str, payload: bytes, properties: dict[str, Any]
) -> None:
    parsed: Request | CommandRejected
    try:
        parsed = parse_request(
            topic, payload, properties, TOPICS, _FUZZ_CONFIG, known=BUILTIN_COMMANDS
        )
    except CommandRejected as rejected:
        parsed = rejected
    if isinstance(parsed, CommandRejected):
        assert parsed.reason
        assert parsed.request_id is None or isinstance(parsed.request_id, str)
        reply = {"id": parsed.request_id, "command": parsed.command, "r": parsed.reason}
        assert json.loads(json.dumps(reply)) == reply  # always addressable and encodable
    else:
        assert _FUZZ_CONFIG.allow is not None
        assert parsed.name in _FUZZ_CONFIG.allow
        assert 0 < len(parsed.id) <= 128
        assert isinstance(parsed.args, dict)
        assert not properties.get("retain")
    address = parsed.reply_to
    assert address.topic
    assert "+" not in address.topic
    assert "#" not in address.topic
    assert TOPICS.cmd_name(address.topic) is None


# --- a real broker ---------------------------------------------------------------------


@pytest.fixture
def agent_side(mosquitto: Mosquitto) -> Iterator[Callable[[str], tuple[MqttLink, CommandRouter]]]:
    """What the agent will wire: an MqttLink whose on_message is the router's."""
    made: list[tuple[MqttLink, CommandRouter]] = []

    def make(protocol: str) -> tuple[MqttLink, CommandRouter]:
        holder: dict[str, MqttLink] = {}

        def reply(topic: str, payload: bytes, properties: dict[str, Any] | None) -> None:
            holder["link"].publish(topic, payload, qos=1, properties=properties)

        router = CommandRouter(TOPICS, CommandsConfig(groups=("kitchen",)), reply)
        connected = threading.Event()
        link = MqttLink(
            mosquitto.mqtt_config(protocol=protocol),
            DEVICE,
            will_payload=b'{"state":"offline"}',
            on_connected=connected.set,
            on_message=router.handle_message,
        )
        holder["link"] = link
        for topic_filter in router.subscriptions():
            link.subscribe(topic_filter, qos=1)
        made.append((link, router))
        link.start()
        assert connected.wait(10)
        return link, router

    yield make
    for link, router in made:
        router.close()
        link.stop()


def _until_answered(broker: Mosquitto, reader: MqttReader, topic: str, **props: Any) -> None:
    """Publishes probe pings until one is answered: the link's subscription is live."""
    for attempt in range(40):
        publish_once(broker, topic, request(f"probe-{attempt}"), properties=props or None)
        try:
            reader.wait_for(lambda m: b'"probe-' in m.payload, timeout=0.25)
        except AssertionError:
            continue
        return
    raise AssertionError("the agent never answered a probe")


def test_ping_round_trip_mqtt5_with_response_topic_and_correlation_data(
    mosquitto: Mosquitto, mqtt_reader: Reader, agent_side: Any
) -> None:
    agent_side("5")
    reader = mqtt_reader(mosquitto, "dash/replies/#")
    props = {"ResponseTopic": "dash/replies/9", "CorrelationData": b"\x09\x00"}
    _until_answered(mosquitto, reader, TOPICS.cmd("ping"), **props)

    publish_once(mosquitto, TOPICS.cmd("ping"), request("p-v5"), properties=props)
    reader.wait_for_count(1, lambda m: b'"p-v5"' in m.payload)
    publish_once(mosquitto, TOPICS.cmd("ping"), request("p-v5"), properties=props)  # redelivery

    got = reader.wait_for_count(2, lambda m: b'"p-v5"' in m.payload)
    for message in got:
        assert message.topic == "dash/replies/9"
        assert message.properties["CorrelationData"] == b"\x09\x00"
        assert message.qos == 1
    assert got[0].payload == got[1].payload
    reply = json.loads(got[0].payload)
    assert reply["stage"] == "succeeded"
    assert reply["result"]["pong"] is True


def test_ping_round_trip_mqtt311_on_the_reply_topic(
    mosquitto: Mosquitto, mqtt_reader: Reader, agent_side: Any
) -> None:
    agent_side("3.1.1")
    reader = mqtt_reader(mosquitto, TOPICS.reply, protocol="3.1.1")
    _until_answered(mosquitto, reader, TOPICS.group_cmd("kitchen", "ping"))

    publish_once(mosquitto, TOPICS.group_cmd("kitchen", "ping"), request("p-311"))
    publish_once(mosquitto, TOPICS.cmd("nope"), b'{"id": 1}')

    [pong] = reader.wait_for_count(1, lambda m: b'"p-311"' in m.payload)
    assert json.loads(pong.payload)["stage"] == "succeeded"
    [refused] = reader.wait_for_count(1, lambda m: b'"id":null' in m.payload)
    assert json.loads(refused.payload)["reason"].startswith("'id' must be a non-empty string")


def test_snapshot_bytes_and_stages_through_a_real_broker(
    mosquitto: Mosquitto, mqtt_reader: Reader, agent_side: Any
) -> None:
    _, router = agent_side("5")
    jpeg = b"\xff\xd8" + b"\x00\x01" * 5000 + b"\xff\xd9"

    def snapshot(_req: Request, progress: Progress) -> object:
        progress.update(50, "captured")
        return BinaryResult(jpeg, "image/jpeg")

    router.register("snapshot", snapshot, long=True)
    reader = mqtt_reader(mosquitto, "dash/snap/#")
    props = {"ResponseTopic": "dash/snap/1", "CorrelationData": b"s"}
    _until_answered(mosquitto, reader, TOPICS.cmd("ping"), **props)

    publish_once(mosquitto, TOPICS.cmd("snapshot"), request("snap-1"), properties=props)

    [binary] = reader.wait_for_count(1, lambda m: m.topic == "dash/snap/1/snapshot")
    assert binary.payload == jpeg
    assert binary.properties["UserProperty"] == [("id", "snap-1")]
    replies = reader.wait_for_count(
        3, lambda m: b'"snap-1"' in m.payload and m.topic == "dash/snap/1"
    )
    stages = [json.loads(m.payload)["stage"] for m in replies]
    assert stages == ["accepted", "progress", "succeeded"]
    assert json.loads(replies[-1].payload)["result"]["bytes"] == len(jpeg)
