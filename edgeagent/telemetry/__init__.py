"""What the agent reports about itself: the periodic telemetry message and the optional
Prometheus endpoint (`report`), and Home Assistant MQTT discovery (`homeassistant`)."""
