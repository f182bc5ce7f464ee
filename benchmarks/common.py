"""Shared helpers of the benchmark scripts: the repository on ``sys.path``, the machine
line every script prints, the final ``key=value`` line, the federation of in-process
clients as the server sees it, and a peak-memory sampler."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import threading
from pathlib import Path

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


class PeakMemory:
    """Samples the proportional set size (PSS: shared pages split between the processes
    that map them, so the sum counts each page once) of this process and all of its
    descendants (SuperLink, simulation, Ray and its workers) every ``interval`` s; with
    ``only``, of those among them whose command line contains it (Ray names an actor's
    process after its class, e.g. ``ray::ClientAppActor``). ``peak_processes`` is the
    most processes counted at once, ``peak_unique_bytes`` the peak of their summed USS
    (pages that only one process maps: what each process adds, without the libraries
    that every Python process with torch shares). With ``only``, ``allocators`` names the
    allocator each counted process ran with ("jemalloc" where it maps it, else "glibc")."""

    def __init__(self, interval: float = 0.25, only: str = "") -> None:
        self.interval, self.only = interval, only
        self.peak_bytes = self.peak_unique_bytes = self.peak_processes = 0
        self.allocators: set[str] = set()
        self._allocators: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def current(self) -> tuple[int, int, int]:
        """The PSS and USS bytes of the counted processes now, and how many there are."""
        me = psutil.Process()
        pss = uss = count = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                if self.only and not any(self.only in part for part in process.cmdline()):
                    continue
                info = process.memory_full_info()
                pss, uss, count = pss + info.pss, uss + info.uss, count + 1
                if self.only:
                    self.allocators.add(self._allocator(process))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        return pss, uss, count

    def _allocator(self, process: psutil.Process) -> str:
        """The allocator ``process`` maps (read once per process: it cannot change)."""
        if process.pid not in self._allocators:
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            self._allocators[process.pid] = "jemalloc" if "libjemalloc" in maps else "glibc"
        return self._allocators[process.pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, uss, count = self.current()
            self.peak_bytes = max(self.peak_bytes, pss)
            self.peak_unique_bytes = max(self.peak_unique_bytes, uss)
            self.peak_processes = max(self.peak_processes, count)
            self._stop.wait(self.interval)
