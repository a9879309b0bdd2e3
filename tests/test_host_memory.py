"""Host-memory trimming during CPU training (mindrlhf.training.host_memory): freed heap pages go back to the system."""
import sys
import threading
from pathlib import Path

import pytest

from mindrlhf.errors import ConfigError
from mindrlhf.training import host_memory

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._glibc() is None,
                                 reason="malloc_trim is glibc's")


# Run in a fresh interpreter: how many freed pages one trim can return depends on what else the process has
# allocated around them (in the suite's process, other tests' threads and MindSpore's heap), not on the trimming.
FREED_HEAP = r"""
import ctypes, re, sys, threading
from mindrlhf.training import host_memory

def rss_mb():
    with open("/proc/self/status", encoding="utf-8") as fh:
        return int(re.search(r"VmRSS:\s+(\d+) kB", fh.read()).group(1)) / 1024

def freed_heap(chunks=150_000, size=1024):
    # ~150 MB of small heap chunks touched, all but the last freed: glibc keeps the freed pages resident (only the
    # top of the heap is trimmed on free, and the kept chunk sits above them), as after a graph compile
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointers = [libc.malloc(size) for _ in range(chunks)]
    for pointer in pointers:
        ctypes.memset(pointer, 1, size)
    for pointer in pointers[:-1]:
        libc.free(pointer)

mode = sys.argv[1]
if mode == "none":
    freed_heap()
    before = rss_mb()
elif mode == "now":
    freed_heap()
    before = rss_mb()
    assert host_memory.trim_now()
else:
    freed_heap()
    before = rss_mb()  # measured before the thread starts: a trim racing the frees would shrink `before`
    trimmed = threading.Event()
    with host_memory.trimming(0.05, trimmed):
        assert trimmed.wait(timeout=120), "the thread never trimmed"
        returned = before - rss_mb()
    print("THREADS", sum(t.name == "mindrlhf-malloc-trim" for t in threading.enumerate()))
print("RETURNED", (returned if mode == "thread" else before - rss_mb()))
"""


def returned_mb(mode: str) -> tuple:
    """(MB the trim gave back, trimming threads left) in a fresh interpreter; mode none / now / thread."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FREED_HEAP, mode], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    values = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("RETURNED", "THREADS")))
    return float(values["RETURNED"]), int(values.get("THREADS", 0))


@linux_glibc
def test_trim_now_returns_freed_heap_pages():
    assert returned_mb("none")[0] < 20, "without a trim the freed pages stay resident (else this test shows nothing)"
    assert returned_mb("now")[0] > 80, "malloc_trim gave back less than 80 of ~150 MB freed"


@linux_glibc
def test_trimming_thread_trims_while_the_block_runs_and_stops_after():
    returned, threads = returned_mb("thread")
    assert returned > 80
    assert threads == 0


def test_trim_interval_from_the_environment():
    assert host_memory.trim_interval({}) == host_memory.DEFAULT_INTERVAL
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "1"}) == host_memory.DEFAULT_INTERVAL
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "0"}) is None
    assert host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "2.5"}) == 2.5
    with pytest.raises(ConfigError, match="MINDRLHF_MALLOC_TRIM"):
        host_memory.trim_interval({"MINDRLHF_MALLOC_TRIM": "often"})


def test_no_interval_no_thread():
    with host_memory.trimming(None):
        assert not [t for t in threading.enumerate() if t.name == "mindrlhf-malloc-trim"]


def test_pool_settings_keep_the_runs_own_memory_settings():
    """MindFormers' build_context cannot set memory after us, so the run's settings travel with ours."""
    settings = host_memory.pool_settings({"max_device_memory": "30GB", "mempool_block_size": "1GB",
                                          "memory_optimize_level": "O1"}, 6 * host_memory.GB)
    assert settings == {"init_size": "12.00GB", "max_size": "30GB", "increase_size": "1GB", "optimize_level": "O1"}
    assert host_memory.pool_settings({}, host_memory.GB // 2) == {
        "init_size": "1.00GB", "max_size": "1024GB", "increase_size": "2GB", "optimize_level": "O0"}


RESERVE = """
import json, sys
from mindrlhf.training import host_memory
settings = host_memory.reserve_pool_block({}, log=lambda m: None)
import mindspore as ms, numpy as np
from mindspore._c_expression import RuntimeConf
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
total = float((ms.Tensor(np.ones((256, 256), np.float32)) * 2).sum())
print("RESULT " + json.dumps({"settings": settings, "configured": RuntimeConf.get_instance().is_memory_configured(),
                              "total": total, "available_kb": host_memory._meminfo_kb("MemAvailable")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_reserve_pool_block_configures_mindspore_before_anything_runs(switch):
    import json
    import os
    import subprocess

    env = dict(os.environ, MINDRLHF_CPU_POOL_BLOCK=switch)
    done = subprocess.run([sys.executable, "-c", RESERVE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result["total"] == 2 * 256 * 256
    if switch == "0" or host_memory._strict_overcommit():
        assert result["settings"] is None
        return
    reserved = float(result["settings"]["init_size"][:-2]) * host_memory.GB / 2
    assert abs(reserved - result["available_kb"] * 1024) < 0.25 * host_memory.GB
    assert result["configured"]
