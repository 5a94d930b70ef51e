"""edgeagent: on-device LiteRT inference for fleets of Raspberry Pi class devices."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeagent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
