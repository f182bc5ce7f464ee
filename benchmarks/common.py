"""Shared helpers of the benchmark scripts: the repository on ``sys.path``, the machine
line every script prints, the final ``key=value`` line, the federation of in-process
clients as the server sees it, and peak-memory measures."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import threading
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    """Where and when the figures were taken."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{memory:.0f} GiB, {gpu}; Python {platform.python_version()}, torch "
        f"{torch.__version__}; {datetime.date.today().isoformat()}"
    )


def federation(clients: list) -> tuple[list, dict]:
    """The ``FederatedClient``s as their method's server side sees them (participants,
    in client order) and the method's initial shared state."""
    from fedalora.methods import Participant

    participants = [Participant(c.partition_id, c.rank, c.data.num_train) for c in clients]
    method, layers = clients[0].method, clients[0].base.layer_shapes()
    return participants, method.initial_shared(layers, [p.rank for p in participants])


def print_figures(**figures: object) -> None:
    """The last line of every benchmark: ``key=value`` pairs (floats to 4 significant)."""
    print(
        " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
        ),
        flush=True,
    )


PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT, _EXCLUSIVE = np.uint64(1 << 63), np.uint64(1 << 56)
_FRAME = np.uint64((1 << 55) - 1)


def _page_entries(pid: int) -> np.ndarray:
    """The page-table entries of ``pid``'s resident pages (``/proc/PID/pagemap``: bit 63
    present, bit 56 mapped by this process alone, bits 0-54 the physical frame)."""
    found = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if fields[1].startswith("---") or fields[-1] == "[vsyscall]":
                continue  # no access (guards, reservations): nothing resident
            start, end = (int(address, 16) for address in fields[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            found.append(entries[(entries & _PRESENT) != 0])
    return np.concatenate(found) if found else np.empty(0, dtype=np.uint64)


def group_unique_bytes(pids: list[int]) -> int:
    """The memory that the processes ``pids`` map and no other process does, each page
    counted once: their USS, plus the pages that only they share among themselves (8
    workers mapping one model file hold its pages once, and USS counts them in none).
    A page counts where the times the group maps it equal its map count
    (``/proc/kpagecount``). Needs the physical frames, which Linux shows to root only."""
    entries = np.concatenate([_page_entries(pid) for pid in pids])
    alone = int(((entries & _EXCLUSIVE) != 0).sum())
    frames, times = np.unique(entries[(entries & _EXCLUSIVE) == 0] & _FRAME, return_counts=True)
    if len(frames) and not frames.any():
        raise RuntimeError("physical frames are hidden: group_unique_bytes needs root")
    mapped = np.empty(len(frames), dtype=np.uint64)
    block = 512  # kpagecount entries per read
    firsts, starts = np.unique(frames // np.uint64(block), return_index=True)
    ends = [*starts[1:].tolist(), len(frames)]
    with open("/proc/kpagecount", "rb", buffering=0) as kpagecount:
        for first, start, end in zip(firsts.tolist(), starts.tolist(), ends, strict=True):
            kpagecount.seek(first * block * 8)
            counts = np.frombuffer(kpagecount.read(block * 8), dtype=np.uint64)
            mapped[start:end] = counts[(frames[start:end] - np.uint64(first * block)).astype(int)]
    return (alone + int((mapped == times).sum())) * PAGE


class PeakMemory:
    """Samples the proportional set size (PSS: shared pages split between the processes
    that map them, so the sum counts each page once) of this process and all of its
    descendants (SuperLink, simulation, Ray and its workers) every ``interval`` s; with
    ``only``, of those among them whose command line contains it (Ray names an actor's
    process after its class, e.g. ``ray::ClientAppActor``). ``peak_processes`` is the
    most processes counted at once, ``peak_unique_bytes`` the peak of their summed USS
    (pages that only one process maps: what each process adds, without the libraries
    that every Python process with torch shares). With ``only``, ``allocators`` names the
    allocator each counted process ran with ("jemalloc" where it maps it, else "glibc").
    With ``group``, ``peak_group_bytes`` is the peak of the counted processes'
    ``group_unique_bytes`` (root only; a sample then takes about half a second)."""

    def __init__(self, interval: float = 0.25, only: str = "", group: bool = False) -> None:
        self.interval, self.only, self.group = interval, only, group
        self.peak_bytes = self.peak_unique_bytes = self.peak_processes = 0
        self.peak_group_bytes = 0
        self.allocators: set[str] = set()
        self._allocators: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        if self.group:
            group_unique_bytes([os.getpid()])  # root only: say so now, not in the thread
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def current(self) -> tuple[int, int, int, int]:
        """The PSS, USS and (with ``group``) group-unique bytes of the counted processes
        now, and how many there are."""
        me = psutil.Process()
        pss = uss = 0
        counted = []
        for process in [me, *me.children(recursive=True)]:
            try:
                if self.only and not any(self.only in part for part in process.cmdline()):
                    continue
                info = process.memory_full_info()
                pss, uss = pss + info.pss, uss + info.uss
                counted.append(process.pid)
                if self.only:
                    self.allocators.add(self._allocator(process))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        group = 0
        if self.group and counted:
            with contextlib.suppress(OSError):  # a process ended while being read
                group = group_unique_bytes(counted)
        return pss, uss, group, len(counted)

    def _allocator(self, process: psutil.Process) -> str:
        """The allocator ``process`` maps (read once per process: it cannot change)."""
        if process.pid not in self._allocators:
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            self._allocators[process.pid] = "jemalloc" if "libjemalloc" in maps else "glibc"
        return self._allocators[process.pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, uss, group, count = self.current()
            self.peak_bytes = max(self.peak_bytes, pss)
            self.peak_unique_bytes = max(self.peak_unique_bytes, uss)
            self.peak_group_bytes = max(self.peak_group_bytes, group)
            self.peak_processes = max(self.peak_processes, count)
            self._stop.wait(self.interval)
