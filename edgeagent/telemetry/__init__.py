"""What the agent reports about itself: the periodic telemetry message (`report`), the
optional Prometheus endpoint (`prometheus`), and Home Assistant MQTT discovery (`homeassistant`)."""
