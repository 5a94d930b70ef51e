"""The config accepts the documented shape and rejects bad input with file:line messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgeagent.config import (
    ClassificationTask,
    ImagesCamera,
    SyntheticCamera,
    load_config,
    parse_config,
)
from edgeagent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

ISSUE_EXAMPLE = """\
device:
  id: pi-kitchen-01          # default: hostname
mqtt:
  host: 127.0.0.1
  port: 1883
  prefix: edgeagent          # topic root
pipelines:
  - name: shapes
    source: {type: synthetic, width: 640, height: 480, fps: 30}   # fps: 0 = unthrottled
    model: shapes-detector     # a bundled model name, or a path to a .tflite
    accelerator: auto          # auto | edgetpu | gpu | cpu
    threads: 2                 # interpreter threads
    max_fps: 15                # omit for as fast as the source and model allow
  - name: vibration
    source: {type: synthetic-vibration, rate_hz: 1000}
    model: vibration-anomaly
  - name: doorway
    source: {type: images, path: /srv/frames/*.jpg, fps: 2}
    model: /opt/models/some-published-model.tflite   # no manifest: labels from its metadata
"""


def test_the_documented_example_is_accepted() -> None:
    config = parse_config(ISSUE_EXAMPLE)
    assert config.device.id == "pi-kitchen-01"
    assert config.mqtt.protocol == "5"
    shapes, vibration, doorway = config.pipelines
    assert isinstance(shapes.source, SyntheticCamera)
    assert (shapes.source.width, shapes.source.fps, shapes.max_fps) == (640, 30, 15)
    assert vibration.source.type == "synthetic-vibration"
    assert isinstance(doorway.source, ImagesCamera)
    assert doorway.source.path == "/srv/frames/*.jpg"


def test_shipped_example_config_validates() -> None:
    config = load_config(REPO / "deploy" / "edgeagent.yaml")
    assert [p.name for p in config.pipelines] == ["shapes", "vibration"]


def test_defaults_need_no_file_content() -> None:
    config = parse_config("")
    assert config.mqtt.host == "127.0.0.1"
    assert config.device.id  # the host name
    assert config.pipelines == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt:\n  hots: x\n", "<config>:2: mqtt.hots: unknown key"),
        (
            "mqtt:\n  port: 70000\n",
            "<config>:2: mqtt.port: Input should be less than or equal to 65535",
        ),
        (
            "pipelines:\n  - name: a\n    model: m\n    source:\n      type: webcam\n",
            "<config>:4: pipelines.0.source: unknown type 'webcam'",
        ),
        (
            "pipelines:\n  - name: a\n    source: {type: synthetic, fps: -1}\n    model: m\n",
            "<config>:3: pipelines.0.source.fps: Input should be greater than or equal to 0",
        ),
        (
            "pipelines:\n  - name: a\n    source: {type: synthetic}\n",
            "<config>:2: pipelines.0.model: required key is missing",
        ),
        (
            "pipelines:\n  - name: a\n    model: m\n    source: {fps: 1}\n",
            "pipelines.0.source: needs a 'type:' key",
        ),
        ("device:\n  id: a/b\n", "<config>:2: device.id: Value error, must be 1-64 characters"),
        ("mqtt:\n  prefix: 'a/#'\n", "mqtt.prefix: Value error"),
        (
            "device:\n  id: models\n",
            "<config>:2: device.id: Value error, device id 'models' is reserved",
        ),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("mqtt: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)


def test_every_error_is_reported_at_once() -> None:
    text = "mqtt:\n  hots: x\n  port: 0\npipelines: []\nextra: 1\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "mqtt.hots" in message
    assert "mqtt.port" in message
    assert "<config>:5: extra: unknown key" in message


def test_duplicate_pipeline_names_are_rejected() -> None:
    text = (
        "pipelines:\n"
        "  - {name: a, model: m, source: {type: synthetic}}\n"
        "  - {name: a, model: m, source: {type: synthetic}}\n"
    )
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config(text)


def test_protocol_accepts_both_spellings() -> None:
    assert parse_config("mqtt: {protocol: 3.1.1}").mqtt.protocol == "3.1.1"
    assert parse_config("mqtt: {protocol: 5}").mqtt.protocol == "5"
    with pytest.raises(ConfigError, match=r"mqtt\.protocol"):
        parse_config("mqtt: {protocol: 4}")


def test_task_override_is_typed() -> None:
    text = (
        "pipelines:\n"
        "  - name: a\n    model: m\n    source: {type: synthetic}\n"
        "    task: {type: classification, top_k: 5}\n"
    )
    task = parse_config(text).pipelines[0].task
    assert isinstance(task, ClassificationTask)
    assert task.top_k == 5


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.yaml")


def test_the_old_name_of_delivery_still_works_with_a_warning_naming_the_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = "device:\n  id: pi-1\nmodels:\n  keep: 5\n  allow_unsigned: true\n"
    with caplog.at_level(logging.WARNING, "edgeagent.config"):
        config = parse_config(text, "agent.yaml")
    assert config.delivery.keep == 5
    assert config.delivery.allow_unsigned is True
    assert "agent.yaml:3: 'models:' is now called 'delivery:'" in caplog.text


def test_the_old_and_the_new_name_of_delivery_together_are_refused() -> None:
    text = "models:\n  keep: 5\ndelivery:\n  keep: 2\n"
    with pytest.raises(ConfigError, match=r"agent.yaml:1: models: is the old name of delivery:"):
        parse_config(text, "agent.yaml")


def test_an_error_under_the_old_name_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"agent.yaml:4: delivery.keep:"):
        parse_config("device:\n  id: pi-1\nmodels:\n  keep: 0\n", "agent.yaml")
