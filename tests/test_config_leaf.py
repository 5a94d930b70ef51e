"""The configuration is a leaf, and each source backend declares its own facts.

Reading the configuration (and so `edgeagent --help` and `edgeagent status`) loads no
runtime library; the `source:` union and the backend registry come from one list; what a
backend's settings say about its samples is what the backend really delivers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from edgeagent.config import SOURCE_BACKENDS, SourceConfig, parse_config
from edgeagent.hal.sources import SOURCES, open_source

HEAVY = ("ai_edge_litert", "paho", "sqlite3", "PIL", "cryptography", "http.server", "numpy")
"""What a command that only reads its configuration must not load."""

_LOADED = (
    "import json, sys\n"
    "heavy = {heavy!r}\n"
    "def report():\n"
    "    print(json.dumps(sorted(m for m in sys.modules if m in heavy\n"
    "        or m.startswith(tuple(h + '.' for h in heavy)))), file=sys.stderr)\n"
)


def _loaded_after(code: str) -> list[str]:
    """The heavy modules loaded in a fresh interpreter after running `code`."""
    script = _LOADED.format(heavy=HEAVY) + code
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    last = result.stderr.strip().splitlines()[-1]
    return list(json.loads(last))


def test_importing_the_configuration_loads_no_runtime_library() -> None:
    code = "import edgeagent.config\nedgeagent.config.parse_config('')\nreport()\n"
    assert _loaded_after(code) == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["status", "--socket", "/nonexistent/edgeagent.sock"]]
)
def test_help_and_status_load_no_runtime_library(argv: list[str]) -> None:
    code = (
        "from edgeagent.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "report()\n"
    )
    assert _loaded_after(code) == []


def test_status_reads_its_config_without_loading_the_runtime(tmp_path: Path) -> None:
    config = tmp_path / "edgeagent.yaml"
    config.write_text(
        f"control_socket: {tmp_path / 'nothing.sock'}\n"
        "pipelines:\n  - {name: shapes, model: shapes, source: {type: synthetic}}\n",
        encoding="utf-8",
    )
    code = (
        "from edgeagent.cli.main import main\n"
        f"code = main(['status', '--config', {str(config)!r}])\n"
        "report()\n"
        "print(code)\n"
    )
    assert _loaded_after(code) == []


def test_the_source_union_and_the_registry_come_from_one_list() -> None:
    union = typing.get_args(typing.get_args(SourceConfig)[0])
    assert union == SOURCE_BACKENDS
    assert list(SOURCES) == [backend.type_name() for backend in SOURCE_BACKENDS]
    for backend in SOURCE_BACKENDS:
        assert SOURCES[backend.type_name()] == backend.implementation


@pytest.mark.parametrize(
    "source",
    [
        "{type: synthetic, width: 96, height: 64, fps: 0}",
        "{type: synthetic-vibration, window: 32, realtime: false}",
    ],
)
def test_declared_kind_and_shape_are_what_the_backend_delivers(source: str) -> None:
    config = parse_config(f"pipelines:\n  - {{name: p, model: m, source: {source}}}\n")
    settings = config.pipelines[0].source
    opened = open_source(settings)
    try:
        sample = opened.read()
    finally:
        opened.close()
    assert sample.data.shape == settings.sample_shape()
    assert opened.kind == settings.kind
    assert settings.paced() is False  # fps: 0 and realtime: false render on demand
