"""The agent's thread names in the kernel too, so that `top -H`, `ps -L`, /proc/PID/task
and bench/cpu.py tell the threads apart (Python 3.11 names a thread for Python only; the
kernel calls every one of them "python").

The kernel keeps at most 15 bytes of a name: "edgeagent-" is dropped ("p-capture",
"outbox"), "paho-mqtt-client-<id>" becomes "paho-mqtt", and the main thread keeps the
process's name. Linux only; elsewhere, or when /proc is not writable, nothing changes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

_KERNEL_NAME_BYTES = 15
_PREFIX = "edgeagent-"

# What each thread was last given in the kernel: a thread is written again only when its
# name changed, so calling after every start (a simulated fleet starts hundreds of agents
# in one process) does not rewrite every thread each time. The lock keeps concurrent
# starts from writing one thread twice.
_named: weakref.WeakKeyDictionary[threading.Thread, str] = weakref.WeakKeyDictionary()
_named_lock = threading.Lock()


def kernel_name(name: str) -> str:
    """What a Python thread name becomes in the kernel (at most 15 bytes)."""
    if name.startswith("paho-mqtt-client"):
        name = "paho-mqtt"
    name = name.removeprefix(_PREFIX)
    return name.encode()[:_KERNEL_NAME_BYTES].decode(errors="ignore")


def name_kernel_threads() -> None:
    """Gives every live thread of this process but the main one its Python name in the
    kernel (`/proc/self/task/<id>/comm`). Cheap; call it again once new threads run: a
    thread already given its current name is skipped."""
    main = threading.main_thread()
    with _named_lock:
        for thread in threading.enumerate():
            native = thread.native_id
            if thread is main or native is None:
                continue
            name = kernel_name(thread.name)
            if _named.get(thread) == name:
                continue
            try:
                Path(f"/proc/self/task/{native}/comm").write_text(name)
            except OSError as exc:  # not Linux, /proc read-only, or the thread just ended
                log.debug("cannot name thread %s in the kernel: %s", thread.name, exc)
                continue
            _named[thread] = name
