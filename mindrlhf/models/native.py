"""C++ kernels for MindSpore's CPU backend, compiled on first use and cached.

MindSpore runs a user kernel on CPU as `ops.Custom(func="lib.so:Function", func_type="aot")`. The sources live
in mindrlhf/models/kernels/; each is compiled once per machine with the system g++ (-O3 -march=native)
into $MINDRLHF_CACHE (default ~/.cache/mindrlhf), under a name hashed from the source, the compiler, the flags
and the CPU, so an edited source, another compiler or another CPU builds its own copy. The build writes a
temporary file and renames it, so ranks that start together never load half a library. Without a compiler (or
with MINDRLHF_COMPILED_KERNELS=0) `library()` returns None and callers keep MindSpore's own kernels.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from typing import Dict, Optional

from mindrlhf.distributed import rank_and_size
from mindrlhf.io import replaced_whole

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-pthread", "-fPIC", "-shared"]
_LOADED: Dict[str, Optional[str]] = {}
logger = logging.getLogger(__name__)


def cache_dir() -> str:
    root = os.environ.get("MINDRLHF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mindrlhf")
    return os.path.join(root, "kernels")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return "".join(sorted({line for line in fh if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def enabled() -> bool:
    return os.environ.get("MINDRLHF_COMPILED_KERNELS", "1") != "0"


def library(name: str) -> Optional[str]:
    """Path of the compiled `kernels/<name>.cc`, building it if needed; None if it cannot be built (logged
    once) or compiled kernels are switched off."""
    if not enabled():
        return None
    if name in _LOADED:
        return _LOADED[name]
    _LOADED[name] = None
    compiler = os.environ.get("CXX") or shutil.which("g++")
    source = os.path.join(KERNELS, f"{name}.cc")
    if not compiler:
        logger.warning("mindrlhf: no C++ compiler (g++ or $CXX) found; %s uses MindSpore's kernels", name)
        return None
    try:
        with open(source, "rb") as fh:
            code = fh.read()
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(b"\0".join([code, version.encode(), " ".join(FLAGS).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = os.path.join(cache_dir(), f"{name}-{key}.so")
        if not os.path.exists(target):
            with replaced_whole(target) as tmp:
                done = subprocess.run([compiler, *FLAGS, "-o", tmp, source], capture_output=True, text=True,
                                      timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip()[-2000:])
        ctypes.CDLL(target)  # fails here, not inside a graph compile, if the library cannot load
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("mindrlhf: building %s failed, using MindSpore's kernels: %s", source, err)
        return None
    _LOADED[name] = target
    return target


def local_threads() -> int:
    """Threads for a compiled kernel: OMP_NUM_THREADS if set, else this process's cores divided among the
    launcher's ranks (on CPU, msrun's ranks share one host's cores, and threads that outnumber them only wait
    for each other)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(os.environ["OMP_NUM_THREADS"]), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(cores // rank_and_size()[1], 1)
