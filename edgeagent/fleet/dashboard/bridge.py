"""The dashboard's MQTT side: one connection that feeds `FleetState`, sends commands and
waits for their replies, and deploys through the retained desired state.

Threads and hand-offs: paho's network thread (`loop_start`) runs the callbacks; they only
put a received message into a bounded queue (`INBOX_SIZE`; when it is full a message is
dropped and counted in `dropped`, and the log says so once) or hand an acknowledgement to
the event loop with `call_soon_threadsafe`. The server's event loop drains the queue
(`drain`), so `FleetState` and every reply future are touched by that loop only.

Unlike the fleet CLI's `FleetConnection` this connection lives as long as the dashboard:
paho reconnects with the configured back-off, and every (re)connect subscribes again, so
retained status, desired and reported states are read afresh.

Commands follow docs/protocol.md "Commands": a request on `<prefix>/<device>/cmd/<name>`
with an MQTT 5 response topic `<prefix>/<device>/reply/dash-<session>` (under the device's
own tree, which the deploy/mosquitto ACL lets a device write and the operator read) and
the request id as correlation data. With MQTT 3.1.1 replies arrive on
`<prefix>/<device>/reply`; either way they are matched by request id. A snapshot's JPEG
arrives on `<reply topic>/snapshot` before the JSON reply, and is matched by its sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import MqttConfig
from edgeagent.errors import EdgeAgentError
from edgeagent.fleet.dashboard.fleet_state import FleetState
from edgeagent.fleet.rollout import merge_desired, parse_desired
from edgeagent.mqtt.client import make_client
from edgeagent.mqtt.payload import from_json
from edgeagent.mqtt.protocol import desired_payload

log = logging.getLogger(__name__)

INBOX_SIZE: Final = 200_000
BINARIES_KEPT: Final = 32
"""Snapshot images waiting for their JSON reply (matched by sha256)."""
PUBLISH_TIMEOUT_S: Final = 10.0
UNREADABLE_LOGGED: Final = 5


class CommandError(EdgeAgentError):
    """A command or deploy that could not be sent, or got no reply in time."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's terminal reply and, for a snapshot, the image it announced."""

    body: dict[str, Any]
    image: bytes | None = None
    content_type: str | None = None


class FleetBridge:
    """See the module doc. `start()` and `stop()` run on the event loop's thread."""

    def __init__(self, config: MqttConfig, state: FleetState) -> None:
        self.config = config
        self.state = state
        self.session = f"dash-{uuid.uuid4().hex[:12]}"
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(INBOX_SIZE)
        self.dropped = 0
        self.unreadable = 0  # messages whose handling raised (a bug: logged, then skipped)
        self.connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._acks: dict[int, asyncio.Future[str | None]] = {}
        self._binaries: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._client = make_client(
            config, client_id=f"edgeagent-dashboard-{os.getpid()}-{os.urandom(3).hex()}"
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.loop_start()  # connects in the background and keeps reconnecting

    def stop(self) -> None:
        self.connected = False  # a disconnect we asked for is no lost broker
        self._client.disconnect()
        self._client.loop_stop()
        for pending in self._pending.values():
            pending.cancel()
        for ack in self._acks.values():
            ack.cancel()

    # --- paho callbacks (network thread): hand over only ---------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("the MQTT broker at %s refused the dashboard: %s", self.where, reason)
            return
        self.connected = True
        filters = [*self.state.filters(), f"{self.state.prefix}/+/reply/#"]
        client.subscribe([(f, 1) for f in filters])
        log.info("dashboard connected to the MQTT broker at %s", self.where)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.connected:  # False after stop(): that disconnect was ours
            log.warning(
                "dashboard lost the MQTT broker at %s (%s); reconnecting", self.where, reason
            )
        self.connected = False

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("more than %d MQTT messages waiting; dropping new ones", INBOX_SIZE)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if self._loop is not None:
            why = str(reason) if reason.is_failure else None
            self._loop.call_soon_threadsafe(self._acked, mid, why)

    # --- the event loop's side -----------------------------------------------------------

    def _acked(self, mid: int, why: str | None) -> None:
        # Runs after `_publish` registered the mid: both run on this loop, and `_publish`
        # does not yield between publishing and registering.
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(why)

    def drain(self, limit: int = 20_000) -> int:
        """Takes up to `limit` received messages into the state and the reply futures;
        returns how many it took."""
        taken = 0
        while taken < limit:
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            taken += 1
            try:
                parsed = self.state.topics.parse_device(topic)
                if parsed is not None and parsed.kind == "reply":
                    self._take_reply(parsed.rest, payload)
                else:
                    self.state.feed(topic, payload)
            except Exception:  # one unreadable message must not stop the page
                self.unreadable += 1
                if self.unreadable <= UNREADABLE_LOGGED:
                    log.exception("dashboard: cannot take the message on %s (ignored)", topic)
        return taken

    def _take_reply(self, rest: str, payload: bytes) -> None:
        if rest.endswith("snapshot"):
            digest = hashlib.sha256(payload).hexdigest()
            kind = "image/png" if payload.startswith(b"\x89PNG") else "image/jpeg"
            self._binaries[digest] = (payload, kind)
            while len(self._binaries) > BINARIES_KEPT:
                self._binaries.popitem(last=False)
            return
        body = from_json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return
        future = self._pending.get(body["id"])
        if (
            future is not None
            and not future.done()
            and body.get("stage")
            in (
                "succeeded",
                "failed",
            )
        ):
            future.set_result(body)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool, **props: Any) -> None:
        """Publishes (QoS 1) and waits for the broker's acknowledgement."""
        properties = None
        if props and self.config.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in props.items():
                setattr(properties, name, value)
        if not self.connected:
            raise CommandError(
                f"not connected to the MQTT broker at {self.where}: check that it runs and "
                "that the dashboard's broker options are right (the dashboard keeps retrying)"
            )
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CommandError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        mid = int(info.mid)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._acks[mid] = future
        try:
            why = await asyncio.wait_for(future, PUBLISH_TIMEOUT_S)
        except TimeoutError as exc:
            raise CommandError(
                f"the MQTT broker at {self.where} did not acknowledge {topic} within "
                f"{PUBLISH_TIMEOUT_S:g} s"
            ) from exc
        finally:
            self._acks.pop(mid, None)
        if why is not None:
            raise CommandError(
                f"the MQTT broker at {self.where} refused {topic}: {why}: check the broker's "
                "ACL for the dashboard's user (it needs the fleet operator's write rights)"
            )

    async def command(
        self, device: str, name: str, args: dict[str, Any], timeout: float = 15.0
    ) -> Reply:
        """Sends one command and waits for its terminal reply; CommandError on timeout."""
        topics = self.state.topics
        request_id = uuid.uuid4().hex
        root = topics.device_root(device)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            payload = json.dumps({"id": request_id, "args": args}).encode()
            await self._publish(
                f"{root}/cmd/{name}",
                payload,
                retain=False,
                ResponseTopic=f"{root}/reply/{self.session}",
                CorrelationData=request_id.encode(),
            )
            try:
                body = await asyncio.wait_for(future, timeout)
            except TimeoutError as exc:
                raise CommandError(
                    f"{device} did not answer {name} within {timeout:g} s: is it online, and "
                    "does its commands.allow include it?"
                ) from exc
        finally:
            self._pending.pop(request_id, None)
        result = body.get("result")
        digest = result.get("sha256") if isinstance(result, dict) else None
        if body.get("stage") != "succeeded" or not isinstance(digest, str):
            return Reply(body)
        deadline = time.monotonic() + 3.0
        while digest not in self._binaries and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the image was published first; it may be queued
            self.drain()
        image, kind = self._binaries.pop(digest, (None, None))
        return Reply(body, image, kind)

    async def deploy(
        self,
        *,
        device: str | None,
        group: str | None,
        pipeline: str,
        target: tuple[str, str] | None,
        allow_downgrade: bool,
        by: str,
    ) -> tuple[str, dict[str, Any]]:
        """Sets (or clears, `target` None) one pipeline's entry in the retained desired
        state of a device or group, keeping the others: `fleet deploy`'s merge, on the
        state this connection holds (retained, read at subscription). Returns (topic,
        the state published)."""
        topics = self.state.topics
        topic = topics.desired(device) if device is not None else topics.group_desired(group or "")
        raw = self.state.desired_raw.get(topic)
        existing = parse_desired(raw, topic) if raw is not None else None
        state = merge_desired(existing, pipeline, target, by=by, allow_downgrade=allow_downgrade)
        payload = desired_payload(state)
        await self._publish(topic, payload, retain=True)
        self.state.feed(topic, payload)  # the page sees it before the broker echoes it
        return topic, state


__all__ = ["CommandError", "FleetBridge", "Reply"]
