"""The benchmarks' memory measure: pages that a group of processes alone maps, each once."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import group_unique_bytes

MIB = 2**20

#: Maps the file in argv[1] and touches every page of it, writes 16 MiB of its own, and
#: waits for stdin to close.
HOLDER = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    shared = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
touched = sum(shared[i] for i in range(0, len(shared), mmap.PAGESIZE))
own = bytearray(16 * 2**20)
own[:: mmap.PAGESIZE] = b"x" * len(own[:: mmap.PAGESIZE])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_a_file_only_the_group_maps_counts_once_and_shared_pages_not_at_all(tmp_path):
    try:
        group_unique_bytes([os.getpid()])
    except (RuntimeError, OSError):
        pytest.skip("physical frames are shown to root only")
    blob = tmp_path / "weights.bin"
    blob.write_bytes(os.urandom(64 * MIB))
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(blob)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for holder in holders:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        pids = [holder.pid for holder in holders]
        uss = [psutil.Process(pid).memory_full_info().uss for pid in pids]
        alone = [group_unique_bytes([pid]) for pid in pids]
        together = group_unique_bytes(pids)
    finally:
        for holder in holders:
            holder.communicate("")
    # Alone, a holder's unique memory is its USS (its 16 MiB and interpreter; the file it
    # shares with the other holder is not its own).
    for own, unique in zip(uss, alone, strict=True):
        assert unique > 16 * MIB and abs(unique - own) < 2 * MIB
    # Together, the file that only the two map counts once: 64 MiB above their USS.
    assert abs(together - sum(uss) - 64 * MIB) < 4 * MIB
