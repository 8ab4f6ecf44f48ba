"""Run a command and measure its whole process tree: wall time, CPU time and sampled peak RSS / PSS.

A training or tokenizing command is several processes (forked tokenizing workers, datasets' map workers),
so the largest single process (``os.wait4``'s ru_maxrss) understates what it holds. Here a thread samples the
tree every ``interval`` seconds: the root's descendants from ``/proc/<pid>/task/*/children`` (recursively),
each one's ``VmRSS`` (``/proc/<pid>/status``) and ``Pss`` (``/proc/<pid>/smaps_rollup``), summed over the tree.
RSS counts pages shared between the processes (forked workers share the parent's imports) once per process;
PSS divides each shared page between its sharers, so the tree's PSS is what it really occupies. Sampling
misses peaks shorter than the interval. CPU time is the user + system time of the root and every descendant
it waited for (``os.wait4``'s rusage), so it includes worker processes and every thread.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct children of every thread of ``pid`` (empty when it has exited)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its descendants now."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        queue += children(pid)
    return pids


def _kib(path: str, field: str) -> int:
    """A ``Field:  N kB`` line's N from a /proc file (0 when the process or the field is gone)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, processes) of the tree now."""
    pids = tree(root)
    rss = sum(_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    pss = sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    return rss, pss, len(pids)


@dataclass
class TreeRun:
    returncode: int
    wall_s: float
    cpu_s: float  # user + system of the root and the descendants it waited for
    peak_rss_mb: float  # the largest sampled sum of VmRSS over the tree
    peak_pss_mb: float  # the largest sampled sum of Pss over the tree
    max_processes: int  # the most processes seen at once in the tree
    samples: int


def run_tree(
    command: list[str], env: dict[str, str] | None = None, cwd=None, stdout=None, stderr=None, interval: float = 0.1
) -> TreeRun:
    """Run ``command`` to its end, sampling its process tree's memory every ``interval`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
    peak = {"rss": 0, "pss": 0, "procs": 0, "samples": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss, procs = tree_memory(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["procs"] = max(peak["procs"], procs)
            peak["samples"] += 1
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the zombie stays readable until this reaps it
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return TreeRun(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak["rss"] / 1024,
        peak_pss_mb=peak["pss"] / 1024,
        max_processes=peak["procs"],
        samples=peak["samples"],
    )


def isolated_env(home: Path, threads: int, **extra: str) -> dict[str, str]:
    """The environment a measured tool runs in: ``threads`` OpenMP/MKL threads, and every cache and temporary
    file (Hugging Face, datasets, XDG, TMPDIR, medtune's cache, matplotlib's font list) under ``home``, so a
    benchmark writes nothing outside its work directory. ``extra`` is set last (it may move any of them)."""
    paths = {
        "HF_HOME": home / "hf",
        "HF_DATASETS_CACHE": home / "hf" / "datasets",
        "XDG_CACHE_HOME": home / "xdg-cache",
        "TMPDIR": home / "tmp",
        "MEDTUNE_CACHE": home / "medtune-cache",
        "MPLCONFIGDIR": home / "matplotlib",
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        **{key: str(path) for key, path in paths.items()},
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **extra,
    }
