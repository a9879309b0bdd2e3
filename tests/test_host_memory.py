"""Host-memory trimming during CPU training (mindrlhf.training.host_memory): freed heap pages go back to the system."""
import ctypes
import re
import sys
import time

import pytest

from mindrlhf.errors import ConfigError
from mindrlhf.training import host_memory

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._glibc() is None,
                                 reason="malloc_trim is glibc's")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        return int(re.search(r"VmRSS:\s+(\d+) kB", fh.read()).group(1)) / 1024


def freed_heap(chunks=150_000, size=1024):
    """Touch ~150 MB of small heap chunks and free all but the last: glibc keeps the freed pages resident (only
    the top of the heap is trimmed on free, and the kept chunk sits above them), as after a graph compile."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointers = [libc.malloc(size) for _ in range(chunks)]
    for pointer in pointers:
        ctypes.memset(pointer, 1, size)
    for pointer in pointers[:-1]:
        libc.free(pointer)
    return lambda: libc.free(pointers[-1])


@linux_glibc
def test_trim_now_returns_freed_heap_pages():
    release = freed_heap()
    try:
        before = rss_mb()
        assert host_memory.trim_now()
        assert before - rss_mb() > 80, "malloc_trim gave back less than 80 of ~150 MB freed"
    finally:
        release()


@linux_glibc
def test_trimming_thread_trims_while_the_block_runs_and_stops_after():
    with host_memory.trimming(0.05):
        release = freed_heap()
        before = rss_mb()
        deadline = time.monotonic() + 5
        while before - rss_mb() < 80 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert before - rss_mb() > 80
        release()
    import threading
    assert not [t for t in threading.enumerate() if t.name == "mindrlhf-malloc-trim"]


def test_trim_interval_from_the_environment():
    assert host_memory.trim_interval({}) == host_memory.DEFAULT_INTERVAL
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "1"}) == host_memory.DEFAULT_INTERVAL
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "0"}) is None
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "2.5"}) == 2.5
    with pytest.raises(ConfigError, match="MINDRLHF_MALLOC_TRIM"):
        host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "often"})


def test_no_interval_no_thread():
    import threading
    with host_memory.trimming(None):
        assert not [t for t in threading.enumerate() if t.name == "mindrlhf-malloc-trim"]
