"""Processes that end with the process that started them.

A SIGKILLed process cannot clean up: on Linux its children are re-parented to PID 1 and run on, a tokenizing
worker for minutes, a training process started by `accelerate launch` to the end of its run. The kernel can
instead send them a signal when their parent dies (prctl PR_SET_PDEATHSIG): medtune asks for SIGKILL, which
its atomic files are built to survive (a checkpoint or a cache entry is complete or absent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the pid that started it) dies; on Linux only, elsewhere nothing.
    If the parent died before the request was made, exit now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not allowed here (a sandbox): the process lives as before
    if os.getppid() != parent:
        os._exit(1)


def started_by_a_launcher() -> bool:
    """Started by `accelerate launch` or torchrun (whose variables are set), not by a shell: only then is the parent
    a launcher whose death means the run is over (a shell may exit under nohup while training goes on)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
