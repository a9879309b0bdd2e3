"""C++ kernels for MindSpore's CPU backend, compiled on first use and cached.

MindSpore runs a user kernel on CPU as `ops.Custom(func="lib.so:Function", func_type="aot")`. The sources live
in mindrlhf/kernels/ (portable C++17: no compiler builtins or intrinsics, so g++ 9 and later on x86-64
and aarch64 build them); each is compiled once per machine with the system g++ and the flags of its
architecture (`flags()`: -march=native on x86-64, -mcpu=native on aarch64, retried at the architecture's
baseline if the compiler rejects those) into $MINDRLHF_CACHE (default ~/.cache/mindrlhf), under a name hashed
from everything that changes the binary: the source, the compiler and its target, the flags and the CPU
(`cpu_signature()`: model and flags on x86, implementer/part/features on arm64). So an edited source, another
compiler or another CPU builds its own copy, and ranks sharing one cache never load different kernels under one
name. Ranks (or hosts sharing the cache over NFS) that start together take a lock file and build once; the build
writes a name no other writer picks (host, pid, random) and renames it, so nobody loads half a library.
Without a compiler, or if the build fails (logged), or with MINDRLHF_COMPILED_KERNELS=0, `library()` returns
None and callers keep MindSpore's own kernels.
"""
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

from mindrlhf.distributed import local_rank_count
from mindrlhf.io import replaced_whole

KERNELS = os.path.dirname(os.path.abspath(__file__))
# -fno-trapping-math: the exp loops (softmax, SwiGLU) hold selects GCC vectorises only if it may assume no FP trap
# (nobody enables traps here); AVX-512's masked instructions hid that, AVX2, SSE2 and NEON ran those loops scalar
# (attention 2x, SwiGLU 5-9x slower than the AVX-512 build). IEEE results, NaN and inf are unchanged.
COMMON_FLAGS = ["-std=c++17", "-O3", "-fopenmp-simd", "-fno-trapping-math", "-pthread", "-fPIC", "-shared"]
# Per architecture: the flags tuned to this CPU, then a baseline every CPU of the architecture runs.
ARCH_FLAGS = {
    "x86_64": (["-march=native", "-mprefer-vector-width=512"], ["-march=x86-64"]),  # (x86-64-v2 needs GCC 11)
    "aarch64": (["-mcpu=native"], ["-march=armv8-a"]),
}
# /proc/cpuinfo fields that -march/-mcpu=native depends on: x86 names its model and flags; arm64 has neither
# and names the core by implementer, part, variant and revision, with its extensions under Features.
CPU_FIELDS = ("model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
              "CPU revision", "Features", "cpu", "isa")
LOCK_WAIT = 900.0  # seconds to wait for another process's build (compiles time out after 300) before our own
_LOADED: Dict[str, Optional[str]] = {}
logger = logging.getLogger(__name__)


def cache_dir() -> str:
    root = os.environ.get("MINDRLHF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mindrlhf")
    return os.path.join(root, "kernels")


def machine(name: Optional[str] = None) -> str:
    """x86_64, aarch64 or what platform.machine() says (arm64/AMD64 spelled the Linux way)."""
    name = (name or platform.machine()).lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def flags(arch: Optional[str] = None, baseline: bool = False) -> List[str]:
    """g++ flags for `arch` (default this machine's): tuned to this CPU, or the architecture's baseline. An
    architecture we do not know gets no -march at all (the compiler's default target).
    MINDRLHF_KERNEL_FLAGS replaces the tuned ones (e.g. "-march=haswell": an AVX2 build on an AVX-512 host, to
    see what an AVX2 CPU gets, or one build for a cluster of mixed CPUs); the flags are part of the cache key."""
    tuned, base = ARCH_FLAGS.get(machine(arch), ([], []))
    override = os.environ.get("MINDRLHF_KERNEL_FLAGS", "").split()
    return [*COMMON_FLAGS, *(base if baseline else (override or tuned))]


def cpu_signature(cpuinfo: Optional[str] = None, arch: Optional[str] = None) -> str:
    """What a native build depends on: the architecture and the CPU_FIELDS lines of /proc/cpuinfo (each
    distinct line once, so core count does not matter, while a big.LITTLE mix lists both cores)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = platform.processor()
    lines = set()
    for line in cpuinfo.splitlines():
        field, sep, value = line.partition(":")
        if sep and field.strip() in CPU_FIELDS:
            lines.add(f"{field.strip()}: {' '.join(value.split())}")
    return "\n".join([machine(arch), *sorted(lines)])


def _compiler_identity(compiler: str) -> str:
    """The compiler's version and target triple (a cross compiler in $CXX builds for another machine)."""
    return "\n".join(subprocess.run([compiler, option], capture_output=True, text=True, timeout=60).stdout
                     for option in ("--version", "-dumpmachine"))


def build_key(code: bytes, compiler_identity: str, build_flags: List[str], cpu: str) -> str:
    return hashlib.sha256(b"\0".join([code, compiler_identity.encode(), " ".join(build_flags).encode(),
                                      cpu.encode()])).hexdigest()[:16]


@contextmanager
def _build_lock(folder: str):
    """Hold kernels/.build.lock (flock; Linux NFS clients map it to a lock the server sees) while building, so
    ranks that start together build once. Waits at most LOCK_WAIT seconds, then builds anyway: the unique
    temporary name and the rename keep that safe, only slower. Where locks are not supported, no lock."""
    os.makedirs(folder, exist_ok=True)
    try:
        fd = os.open(os.path.join(folder, ".build.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        deadline, waiting = time.monotonic() + LOCK_WAIT, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    logger.warning("mindrlhf: no build lock in %s (%s); building without it", folder, err)
                    break
                if not waiting:
                    logger.info("mindrlhf: waiting for another process's kernel build in %s", folder)
                    waiting = True
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def build(source: str, compiler: str, build_flags: List[str], cpu: str, folder: str) -> str:
    """The library for `source` built with these flags in `folder`, built now unless another process has;
    raises RuntimeError with the compiler's message if it fails."""
    with open(source, "rb") as fh:
        code = fh.read()
    name = os.path.splitext(os.path.basename(source))[0]
    key = build_key(code, _compiler_identity(compiler), build_flags, cpu)
    target = os.path.join(folder, f"{name}-{key}.so")
    if os.path.exists(target):
        return target
    with _build_lock(folder):
        if os.path.exists(target):  # built by whoever held the lock before us
            return target
        started = time.monotonic()
        with replaced_whole(target) as tmp:
            done = subprocess.run([compiler, *build_flags, "-o", tmp, source], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-2000:])
        logger.info("mindrlhf: built %s in %.1f s (%s)", target, time.monotonic() - started, " ".join(build_flags))
    return target


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
    errors = []
    for baseline in (False, True):
        try:
            target = build(source, compiler, flags(baseline=baseline), cpu_signature(), cache_dir())
            ctypes.CDLL(target)  # fails here, not inside a graph compile, if the library cannot load
        except RuntimeError as err:  # the compiler refused: the tuned flags may be what it does not know
            errors.append(f"{' '.join(flags(baseline=baseline))}: {err}")
            continue
        except (OSError, subprocess.SubprocessError) as err:  # no compiler, a timeout, a library that won't load
            errors.append(str(err))
            break
        if baseline:
            logger.warning("mindrlhf: %s built at the %s baseline (the tuned flags failed: %s)", name, machine(),
                           errors[0])
        logger.info("mindrlhf: compiled kernels %s", target)
        _LOADED[name] = target
        return target
    logger.warning("mindrlhf: building %s failed, using MindSpore's kernels: %s", source, "; ".join(errors))
    return None


def local_threads(cores: Optional[int] = None) -> int:
    """Threads for a compiled kernel: OMP_NUM_THREADS if set, else this process's cores divided among the
    ranks on this host (`local_rank_count()`: on one host msrun's or the rank table's ranks share its cores,
    and threads that outnumber them only wait for each other; ranks on other hosts have their own). A rank
    that msrun --bind_core pinned (MSRUN_CPU_LIST) already has only its own cores. `cores`: this process's
    usable cores (default: its CPU affinity)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(os.environ["OMP_NUM_THREADS"]), 1)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("MSRUN_CPU_LIST"):
        return max(cores, 1)
    return max(cores // local_rank_count(), 1)
