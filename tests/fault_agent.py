"""`edgeagent` with a hung accelerator, for tests only: run as

    python -m tests.fault_agent --hang-invoke-after N run --config CONFIG

It is the real CLI (`edgeagent.cli.main`) in which each pipeline's inference thread blocks
for good inside LiteRT's `invoke()` after N invokes of its own, as a hung delegate or driver
does: exactly N results per pipeline are published, capture goes on, and the thread never
returns. Invokes on other threads (warm-up, bench) are not counted and never hang.

The agent itself reads no fault-injection switch: the hang is installed here, in the test
process that the systemd watchdog test starts, by replacing the `Interpreter` class the
engine builds its interpreters from.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections import Counter
from collections.abc import Sequence

from ai_edge_litert.interpreter import Interpreter

from edgeagent.cli import main as cli
from edgeagent.inference import engine

log = logging.getLogger(__name__)

_INFERENCE_THREAD_SUFFIX = "-infer"  # `edgeagent-<pipeline>-infer`, see pipeline.py


def hanging_interpreter(after: int) -> type[Interpreter]:
    """An Interpreter whose invoke() never returns once an inference thread has made
    `after` calls of its own."""
    invokes: Counter[str] = Counter()
    lock = threading.Lock()

    class HangingInterpreter(Interpreter):  # type: ignore[misc]
        def invoke(self) -> None:
            thread = threading.current_thread().name
            if thread.endswith(_INFERENCE_THREAD_SUFFIX):
                with lock:
                    invokes[thread] += 1
                    hang = invokes[thread] > after
                if hang:
                    log.warning("fault injection: %s hangs in invoke()", thread)
                    threading.Event().wait()
            super().invoke()

    return HangingInterpreter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_agent")
    parser.add_argument("--hang-invoke-after", type=int, required=True, metavar="N")
    args, rest = parser.parse_known_args(argv)
    if args.hang_invoke_after < 1:
        parser.error("--hang-invoke-after takes N >= 1")
    engine.Interpreter = hanging_interpreter(args.hang_invoke_after)  # type: ignore[misc]
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
