"""Host memory of CPU training: freed heap pages given back (malloc_trim), and one memory-pool block for all.

1. malloc_trim.
Why: on CPU MindSpore's graph compile allocates hundreds of MB of small host objects (IR, kernel graphs) and frees
much of it before the step runs, but glibc keeps freed heap pages resident. Tensors of the step come from
MindSpore's memory pool, which mallocs 1 GB blocks, always fresh mmaps, so those kept pages are never reused
and simply add to the peak. malloc_trim(0) returns every whole free page of every arena. Measured (Qwen2.5-0.5B
shape, LoRA r16, seq 512, 1 pair, AMD EPYC 2 cores): peak RSS 8 layers 3552 -> 3304 MB. MindSpore compiles
inside the first step's call, so there is no hook between compile and execution: a thread trims every
`interval` seconds while training runs. MINDRLHF_MALLOC_TRIM=0 turns it off; a number sets the interval.

2. The pool's first block. MindSpore's CPU pool starts with a block of init_size / 2 (1 GB by default) and grows by
1 GB blocks (increase_size and mempool_block_size do not change that on CPU). From step to step its best fit
places tensors differently and ends up touching every block it has, so up to a block more than the step's peak
use becomes resident: at 24 layers the pool peaked at 3159 MB in use and 4096 MB resident (+900 MB in step 2). One
first block as large as the free memory holds any step that fits in RAM; only the pages a step touches are
resident (malloc'd address space costs nothing until used): resident 3186 MB for the same 3159, peak RSS 8327 ->
7417 MB. Skipped under strict overcommit (vm.overcommit_memory=2, where reserved address space counts), when
memory is already configured, or with MINDRLHF_CPU_POOL_BLOCK=0.
"""
import ctypes
import ctypes.util
import os
import threading
from contextlib import contextmanager
from typing import Optional

GB = 1 << 30

DEFAULT_INTERVAL = 0.5  # seconds; one trim takes milliseconds (it walks the free chunks once)


def _glibc():
    """libc with malloc_trim, or None (musl, macOS, Windows: nothing to do there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def trim_interval(environ=None) -> Optional[float]:
    """Seconds between trims from MINDRLHF_MALLOC_TRIM (unset: DEFAULT_INTERVAL), None when it is 0/off."""
    value = (environ if environ is not None else os.environ).get("MINDRLHF_MALLOC_TRIM", "").strip().lower()
    if value in ("", "1", "on", "true"):
        return DEFAULT_INTERVAL
    if value in ("0", "off", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        from mindrlhf.errors import ConfigError
        raise ConfigError(f"MINDRLHF_MALLOC_TRIM='{value}': 0 (off), 1 (on) or seconds between trims") from None
    return seconds if seconds > 0 else None


def trim_now() -> bool:
    """Return free heap pages to the system once; False where glibc is not the allocator."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def trimming(interval: Optional[float] = DEFAULT_INTERVAL, trimmed: Optional[threading.Event] = None):
    """Trim every `interval` seconds in a daemon thread while the block runs (no-op for None or without glibc).
    `trimmed` is set after each trim (tests wait on it instead of on the clock)."""
    libc = _glibc() if interval else None
    if libc is None:
        yield
        return
    stop = threading.Event()

    def run():
        while not stop.wait(interval):
            libc.malloc_trim(0)
            if trimmed is not None:
                trimmed.set()

    thread = threading.Thread(target=run, name="mindrlhf-malloc-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _meminfo_kb(field: str, text: Optional[str] = None) -> Optional[int]:
    if text is None:
        try:
            with open("/proc/meminfo", encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field and value.split():
            return int(value.split()[0])
    return None


def _strict_overcommit() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory", encoding="utf-8") as fh:
            return fh.read().strip() == "2"
    except OSError:
        return True  # not Linux: do not reserve


def pool_settings(context: dict, available_bytes: int) -> dict:
    """mindspore.runtime.set_memory arguments: a first pool block of `available_bytes` (init_size is split in
    half between the persistent and the common pool), and the run's own max_device_memory, mempool_block_size
    and memory_optimize_level as MindFormers' build_context would pass them (it cannot set them after us)."""
    return {"init_size": f"{2 * available_bytes / GB:.2f}GB",
            "max_size": str(context.get("max_device_memory") or "1024GB"),
            "increase_size": str(context.get("mempool_block_size") or "2GB"),
            "optimize_level": str(context.get("memory_optimize_level") or "O0")}


def reserve_pool_block(context: dict, log=print) -> Optional[dict]:
    """On CPU, before build_context: size the pool's first block to the free memory (see module doc). Returns
    the set_memory arguments used, or None when skipped."""
    import mindspore
    from mindspore._c_expression import RuntimeConf

    if os.environ.get("MINDRLHF_CPU_POOL_BLOCK", "1").strip().lower() in ("0", "off", "false"):
        return None
    available = _meminfo_kb("MemAvailable")
    if available is None or available * 1024 < GB or _strict_overcommit() \
            or RuntimeConf.get_instance().is_memory_configured():
        return None
    settings = pool_settings(context, available * 1024)
    mindspore.runtime.set_memory(**settings)
    log(f"mindrlhf: CPU memory pool's first block sized to the free memory ({available / 2 ** 20:.1f} GB of address "
        "space, resident only as used), so steps do not spread over 1 GB blocks; MindFormers then reports the "
        "memory config as already set")
    return settings
