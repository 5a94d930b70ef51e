"""MQTT: the broker connection, the topic layout, the durable outbox, fleet commands,
telemetry and Home Assistant discovery."""

from edgeagent.mqtt.link import INBOX_SIZE, MqttLink, OnConnected, OnMessage, PublishTicket
from edgeagent.mqtt.topics import Topics

__all__ = ["INBOX_SIZE", "MqttLink", "OnConnected", "OnMessage", "PublishTicket", "Topics"]
