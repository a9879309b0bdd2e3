"""The compiled CPU kernels build and compute right where users' hosts are, and a shared cache stays safe.

- the source is portable C++17 (no builtins, intrinsics or attributes: g++ 9/10 on Kunpeng or Ubuntu 20.04
  build it), and each architecture gets flags its compiler accepts;
- aarch64 for real: the kernels cross-compiled with the aarch64 baseline flags run under qemu-aarch64 and match
  a float64 reference (attention with both adder masks and with the packed mask of positions and codes); the x86-64 baseline build passes the same self-check natively;
- the cache key tells CPUs apart on both architectures (arm64's /proc/cpuinfo has no model name or flags);
- ranks that build at once into one cache build once and all load the same library, leaving no temporary file;
- kernel threads divide the cores by the ranks on this host, not in the whole job.
"""
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mindrlhf import distributed, io
from mindrlhf.kernels import native

HERE = Path(__file__).parent
CPUINFO = HERE / "data" / "cpuinfo"
SOURCE = Path(native.KERNELS) / "cpu_kernels.cc"
SYSROOT = "/usr/aarch64-linux-gnu"


def test_kernel_source_is_portable_cpp17():
    """No compiler builtins, attributes, inline assembly, intrinsics headers or C++20: what GCC 9 (Ubuntu 20.04)
    and 10 (openEuler 22.03) reject, or what ties the source to one architecture. g++ 12 here accepts all of
    them, so the text is checked, and -std=c++17 -pedantic-errors refuses GNU extensions."""
    forbidden = [r"__builtin", r"__attribute__", r"\b__asm|\basm\s*\(", r"#\s*include\s*<\w*intrin\.h>",
                 r"#\s*include\s*<arm_(neon|sve|acle)\.h>", r"\b_mm\d*_\w+\(", r"\b__m(64|128|256|512)",
                 r"#\s*pragma\s+GCC", r"std::bit_cast", r"#\s*include\s*<(bit|span|concepts|ranges)>",
                 r"\b__int128", r"\b__restrict"]
    for path in sorted(Path(native.KERNELS).glob("*.cc")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            for pattern in forbidden:
                assert not re.search(pattern, code), f"{path.name}:{number}: not portable C++17: {line.strip()}"
        if not shutil.which("g++"):
            continue  # the text check above still ran
        done = subprocess.run(["g++", "-std=c++17", "-fopenmp-simd", "-pedantic-errors", "-Wall", "-Werror", "-fsyntax-only",
                               str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]


def test_flags_per_architecture():
    x86, arm, other = native.flags("x86_64"), native.flags("aarch64"), native.flags("riscv64")
    for chosen in (x86, arm, other, native.flags("arm64", baseline=True), native.flags("AMD64", baseline=True)):
        assert "-std=c++17" in chosen and "-O3" in chosen and "-shared" in chosen
    assert "-march=native" in x86 and "-mprefer-vector-width=512" in x86
    assert "-mcpu=native" in arm and not any(f.startswith(("-mprefer", "-march=native")) for f in arm)
    assert native.flags("arm64", baseline=True)[-1] == "-march=armv8-a"
    assert native.flags("AMD64", baseline=True)[-1] == "-march=x86-64"  # any GCC; x86-64-v2 needs 11
    assert not any(f.startswith("-m") for f in other)


def test_kernel_flags_override_replaces_the_tuned_flags_only(monkeypatch):
    """MINDRLHF_KERNEL_FLAGS (an AVX2 build on an AVX-512 host, one build for mixed CPUs) replaces the tuned
    flags, keeps the common ones and the baseline, and builds under its own cache key."""
    tuned = native.flags("x86_64")
    monkeypatch.setenv("MINDRLHF_KERNEL_FLAGS", "-march=haswell -mtune=haswell")
    chosen = native.flags("x86_64")
    assert chosen[-2:] == ["-march=haswell", "-mtune=haswell"] and "-march=native" not in chosen
    assert chosen[:len(native.COMMON_FLAGS)] == native.COMMON_FLAGS
    assert native.flags("x86_64", baseline=True)[-1] == "-march=x86-64"
    assert native.build_key(b"src", "g++", chosen, "cpu") != native.build_key(b"src", "g++", tuned, "cpu")


def test_cache_key_tells_cpus_apart_on_both_architectures():
    kunpeng, n1, xeon = ((CPUINFO / name).read_text() for name in ("kunpeng920.txt", "neoverse_n1.txt",
                                                                    "xeon8260.txt"))
    arm_key = native.cpu_signature(kunpeng, "aarch64")
    assert "CPU implementer: 0x48" in arm_key and "CPU part: 0xd01" in arm_key and "asimddp" in arm_key
    assert arm_key != native.cpu_signature(n1, "aarch64")  # Kunpeng 920 vs Neoverse N1: own libraries
    first_two_cores = kunpeng.split("\n\n")[:2]
    assert native.cpu_signature("\n\n".join(first_two_cores), "aarch64") == arm_key  # core count is not the CPU
    x86_key = native.cpu_signature(xeon, "x86_64")
    assert "model name: Intel(R) Xeon(R) Platinum 8260" in x86_key and "avx512f" in x86_key
    assert "MHz" not in x86_key and "apicid" not in x86_key  # what varies between reads or cores stays out
    less_avx = xeon.replace(" avx512_vnni", "")
    assert native.cpu_signature(less_avx, "x86_64") != x86_key
    assert native.cpu_signature(kunpeng, "aarch64") != native.cpu_signature(kunpeng, "x86_64")
    keys = {native.build_key(b"src", "g++ 10.3", native.flags("aarch64"), native.cpu_signature(text, "aarch64"))
            for text in (kunpeng, n1)}
    assert len(keys) == 2


# ---- the numeric self-check, run natively at the x86-64 baseline and under qemu-aarch64 ----

class Manifest:
    """Writes the self-check's inputs and its manifest; reads its outputs back."""

    def __init__(self, folder: Path):
        self.folder, self.lines, self.count = folder, ["threads 2"], 0

    def file(self, array=None, shape=None):
        self.count += 1
        path = self.folder / f"t{self.count}.bin"
        if array is not None:
            np.ascontiguousarray(array, np.float32).tofile(path)
        return path, tuple(shape if shape is not None else array.shape)

    def call(self, name, inputs, outputs):
        """inputs: arrays or (path, shape) of earlier outputs; outputs: shapes. Returns the output files."""
        self.lines.append(f"call {name}")
        files = []
        for kind, items in (("in", inputs), ("out", outputs)):
            for item in items:
                path, shape = (item if isinstance(item, tuple) and isinstance(item[0], Path) else
                               self.file(item) if kind == "in" else self.file(shape=item))
                self.lines.append(f"{kind} {len(shape)} {' '.join(map(str, shape))} {path}")
                if kind == "out":
                    files.append((path, shape))
        self.lines.append("end")
        return files

    def write(self):
        path = self.folder / "manifest.txt"
        path.write_text("\n".join(self.lines) + "\n")
        return path


def read(item):
    path, shape = item
    return np.fromfile(path, np.float32).reshape(shape)


def close(have, want, tol, name):
    np.testing.assert_allclose(have, want, rtol=0, atol=tol * max(float(np.abs(want).max()), 1e-30), err_msg=name)


def run_selfcheck(tmp_path, compiler, arch, prefix, lib=None):
    """Build the library as native.py does (its build(), this architecture's baseline flags) unless given, and
    the driver; run every kernel through the driver and compare with float64."""
    from test_cpu_speedups import attention_inputs, reference_attention

    lib = lib or native.build(str(SOURCE), compiler, native.flags(arch, baseline=True), f"selfcheck {arch}",
                              str(tmp_path / "cache"))
    driver = tmp_path / "selfcheck"
    done = subprocess.run([compiler, "-std=c++17", "-O1", "-o", str(driver), str(HERE / "native" / "selfcheck.cc"),
                           "-ldl"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kind = subprocess.run(["file", "-b", lib], capture_output=True, text=True).stdout if shutil.which("file") else ""
    assert not kind or ("aarch64" in kind) == (arch == "aarch64"), kind

    rng = np.random.default_rng(7)
    m = Manifest(tmp_path)
    cases = [(2, 37, 16, 4, 2, True), (2, 19, 64, 2, 2, False)]  # odd lengths: row blocks and key blocks with tails
    expected = []
    for batch, seq, size, heads, groups, per_key in cases:
        inputs = attention_inputs(rng, batch, seq, size, heads, groups, per_key)
        out, stats = m.call("RopeAttentionForward", inputs,
                            [(batch, seq, heads * size), (batch, heads, seq, 2)])
        dout = rng.normal(size=(batch, seq, heads * size)).astype(np.float32)
        grads = m.call("RopeAttentionBackward", inputs + [out, stats, dout],
                       [x.shape for x in inputs[:3]])
        want, want_grads = reference_attention(*inputs, heads, groups)
        expected.append((out, want, grads, want_grads(dout.astype(np.float64))))
    # the packed-mask path (B, 2, 1, S) of positions and layout codes: spans, shared-prefix answers, in-span pads
    # and filler in one row, checked against the float64 reference of the visibility rule
    from mindrlhf.data import packing as pk
    from test_packed_kernel import packed_case, reference as packed_reference

    size, heads, groups = 16, 4, 2
    _, inputs, _, positions, codes, _ = packed_case(11, 83, size, heads, groups)
    batch, seq = codes.shape
    out, stats = m.call("RopeAttentionForward", inputs, [(batch, seq, heads * size), (batch, heads, seq, 2)])
    dout = rng.normal(size=(batch, seq, heads * size)).astype(np.float32)
    grads = m.call("RopeAttentionBackward", inputs + [out, stats, dout], [x.shape for x in inputs[:3]])
    want, want_grads = packed_reference(*inputs[:5], positions, np.stack([pk.visible(c) for c in codes]), heads,
                                        groups)
    expected.append((out, want, grads, want_grads(dout.astype(np.float64))))
    x = rng.normal(size=(3, 47, 37)).astype(np.float32)
    w = rng.normal(size=(37,)).astype(np.float32)
    eps = np.array([1e-5], np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    (y,) = m.call("RmsNormForward", [x, w, eps], [x.shape])
    dx, dw = m.call("RmsNormBackward", [x, w, eps, dy], [x.shape, w.shape])
    gate, up = (rng.normal(scale=4.0, size=(5, 301)).astype(np.float32) for _ in range(2))
    gate[0, :3] = [-100.0, 100.0, 0.0]
    dout = rng.normal(size=gate.shape).astype(np.float32)
    (act,) = m.call("SwigluForward", [gate, up], [gate.shape])
    dgate, dup = m.call("SwigluBackward", [gate, up, dout], [gate.shape, gate.shape])

    done = subprocess.run([*prefix, str(driver), lib, str(m.write())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = done.stdout.split()
    assert calls[1::2] == ["0"] * 10 and len(calls) == 20, done.stdout  # every kernel ran and accepted its shapes

    for out, want, grads, want_grads in expected:
        close(read(out), want, 2e-5, "attention")
        for name, have, want_grad in zip("qkv", grads, want_grads):
            close(read(have), want_grad, 5e-5, f"d{name}")
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    rstd = 1 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    normed = x64 * rstd
    close(read(y), normed * w64, 2e-6, "rmsnorm")
    gw = dy64 * w64
    close(read(dx), rstd * (gw - normed * (gw * normed).mean(-1, keepdims=True)), 1e-5, "rmsnorm dx")
    close(read(dw), (dy64 * normed).reshape(-1, 37).sum(0), 1e-5, "rmsnorm dw")
    g64, u64, d64 = (a.astype(np.float64) for a in (gate, up, dout))
    sig = 1 / (1 + np.exp(-g64))
    close(read(act), g64 * sig * u64, 2e-6, "swiglu")
    close(read(dgate), d64 * u64 * sig * (1 + g64 * (1 - sig)), 1e-5, "swiglu dgate")
    close(read(dup), d64 * g64 * sig, 1e-5, "swiglu dup")


def test_aarch64_build_passes_the_self_check_under_qemu(tmp_path):
    """The aarch64 flags (at the armv8-a baseline: emulation cannot reproduce a host's -mcpu=native) build the
    kernels with Debian's cross g++, and they compute right on an emulated aarch64 CPU."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64")
    if not compiler or not qemu or not os.path.isdir(SYSROOT):
        pytest.skip("needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them): "
                    f"aarch64-linux-gnu-g++ {compiler or 'missing'}, qemu-aarch64 {qemu or 'missing'}, "
                    f"sysroot {SYSROOT} {'present' if os.path.isdir(SYSROOT) else 'missing'}")
    run_selfcheck(tmp_path, compiler, "aarch64", [qemu, "-L", SYSROOT])


def test_compiler_refusing_native_gets_the_baseline_build_which_passes_the_self_check(tmp_path, monkeypatch,
                                                                                         caplog):
    """A g++ that refuses -march/-mcpu=native (as a cross compiler does, or an older one that does not know the
    CPU): library() retries at the architecture's baseline and says so, and that build computes right."""
    if native.machine() != "x86_64" or not shutil.which("g++"):
        pytest.skip(f"needs g++ on an x86-64 host (this is {native.machine()})")
    wrapper = tmp_path / "old-g++"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -march=native|-mcpu=native)\n'
                       '  echo "cc1plus: error: unknown value \'native\' for \'-march\'" >&2; exit 1;; esac; done\n'
                       f'exec {shutil.which("g++")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("MINDRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1")
    monkeypatch.setattr(native, "_LOADED", {})
    lib = native.library("cpu_kernels")
    assert lib and "built at the x86_64 baseline" in caplog.text and "unknown value 'native'" in caplog.text
    run_selfcheck(tmp_path, shutil.which("g++"), "x86_64", [], lib=lib)


# ---- a cache that ranks and hosts share ----

def test_temporary_names_are_unique_across_hosts_and_calls(tmp_path):
    """Two hosts sharing the cache over NFS can have equal pids: the host and a random token keep them apart."""
    target = str(tmp_path / "lib.so")
    names = {io.temporary_name(target) for _ in range(20)}
    assert len(names) == 20
    assert all(name.startswith(f"{target}.tmp-{socket.gethostname()}-{os.getpid()}-") for name in names)


def build_at_once(barrier, queue, index):
    """One 'rank': wait for all, build (or find) the library, run a kernel from it."""
    import ctypes

    barrier.wait(timeout=120)
    path = native.library("cpu_kernels")
    lib = ctypes.CDLL(path)
    gate = (ctypes.c_float * 3)(-1.0, 0.0, 2.0)
    up = (ctypes.c_float * 3)(1.0, 5.0, 3.0)
    out = (ctypes.c_float * 3)()
    params = (ctypes.c_void_p * 3)(ctypes.addressof(gate), ctypes.addressof(up), ctypes.addressof(out))
    shape = (ctypes.c_int64 * 1)(3)
    shapes = (ctypes.POINTER(ctypes.c_int64) * 3)(shape, shape, shape)
    ndims = (ctypes.c_int * 3)(1, 1, 1)
    dtypes = (ctypes.c_char_p * 3)(b"float32", b"float32", b"float32")
    lib.SwigluForward.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    rc = lib.SwigluForward(3, params, ndims, shapes, dtypes, None, None)
    queue.put((index, path, rc, list(out)))


def test_ranks_building_at_once_share_one_library(tmp_path, monkeypatch):
    """Four processes released together by a barrier build into one fresh cache with the real g++: one compile
    (the lock), every one loads the same library and computes with it, no temporary file is left."""
    if not shutil.which("g++"):
        pytest.skip("needs g++")
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -o "*) echo "$$" >> "{log}";; esac\n'
                       f'exec {shutil.which("g++")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("MINDRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1")
    ctx = multiprocessing.get_context("spawn")
    ranks = 4
    barrier, queue = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=build_at_once, args=(barrier, queue, i)) for i in range(ranks)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    paths = {path for _, path, _, _ in results}
    assert len(paths) == 1 and None not in paths, results
    silu = [g / (1 + np.exp(-g)) * u for g, u in ((-1.0, 1.0), (0.0, 5.0), (2.0, 3.0))]
    for _, _, rc, out in results:
        assert rc == 0 and out == pytest.approx(silu, rel=1e-6)
    assert len(log.read_text().split()) == 1, "every rank compiled: " + log.read_text()
    folder = tmp_path / "cache" / "kernels"
    assert sorted(p.name for p in folder.iterdir()) == [".build.lock", os.path.basename(paths.pop())]


# ---- threads: the cores of this host divided by the ranks on this host ----

@pytest.fixture()
def clean_rank_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_RANK_SIZE", "RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "MS_WORKER_NUM",
                 "MS_NODE_ID", "MSRUN_CPU_LIST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_threads_divide_cores_by_the_ranks_on_this_host(clean_rank_env, tmp_path):
    env = clean_rank_env
    assert native.local_threads(cores=64) == 64  # one process
    env.setenv("RANK_SIZE", "16")
    env.setenv("RANK_ID", "9")
    assert native.local_threads(cores=64) == 4  # no word on this host's share: the job's, never oversubscribed
    env.setenv("LOCAL_RANK_SIZE", "8")  # our launchers export it (2 hosts x 8 ranks)
    assert distributed.local_rank_count() == 8 and native.local_threads(cores=64) == 8
    env.delenv("LOCAL_RANK_SIZE")
    # An HCCL rank table: 2 servers, 8 and 4 devices; rank 9 is on the second
    servers = [{"server_id": f"10.0.0.{s}", "device": [{"device_id": str(d), "device_ip": f"192.168.{s}.{d}",
                                                         "rank_id": str(r)} for d, r in enumerate(ranks)]}
               for s, ranks in ((1, range(8)), (2, range(8, 12)))]
    table = tmp_path / "hccl.json"
    table.write_text(json.dumps({"version": "1.0", "server_count": "2", "server_list": servers,
                                 "status": "completed"}))
    env.setenv("RANK_TABLE_FILE", str(table))
    env.setenv("RANK_SIZE", "12")
    assert distributed.local_rank_count() == 4 and native.local_threads(cores=64) == 16
    env.setenv("RANK_ID", "3")
    assert native.local_threads(cores=64) == 8
    env.setenv("MSRUN_CPU_LIST", "[0, 1, 2, 3]")  # msrun --bind_core pinned this rank to its own cores
    assert native.local_threads(cores=4) == 4
    env.setenv("OMP_NUM_THREADS", "3")
    assert native.local_threads(cores=64) == 3


@pytest.mark.parametrize("compiler, arch_flags", [("g++", ["-march=haswell"]), ("g++", ["-march=x86-64"]),
                                                   ("aarch64-linux-gnu-g++", ["-march=armv8-a"])],
                         ids=["avx2", "x86-64-baseline", "aarch64"])
def test_exp_loops_vectorise_without_avx512(compiler, arch_flags):
    """The softmax and SwiGLU loops call exp_ps, whose selects GCC if-converts only when it may assume no FP
    trap: with AVX-512's masked instructions it does anyway, on AVX2, SSE2 and NEON only with
    -fno-trapping-math (native.COMMON_FLAGS). Without it those loops ran scalar there: the attention kernel 2x and
    SwiGLU 5-9x slower than the AVX-512 build, and the tiny step no faster than MindSpore's own ops (bench_kernels
    built for -march=haswell on a Zen 5). Every loop calling exp_ps must be reported vectorised."""
    path = shutil.which(compiler)
    if not path or (compiler == "g++" and native.machine() != "x86_64"):
        pytest.skip(f"needs {compiler} targeting {'x86-64' if compiler == 'g++' else 'aarch64'}")
    lines = SOURCE.read_text().splitlines()
    calls = [number for number, line in enumerate(lines, 1)
             if "exp_ps(" in line.split("//")[0] and "inline float exp_ps" not in line]
    assert len(calls) >= 4  # softmax forward and backward, SwiGLU forward and backward
    flags = [f for f in native.COMMON_FLAGS if f != "-shared"] + arch_flags
    done = subprocess.run([path, *flags, "-c", "-fopt-info-vec-optimized", "-o", os.devnull, str(SOURCE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    vectorised = {int(m.group(1)) for m in re.finditer(rf"{SOURCE.name}:(\d+):\d+: optimized: loop vectorized",
                                                       done.stderr)}
    for number in calls:  # the report names a line of the loop, from its `for` to the call
        loop = max(n for n in range(1, number + 1) if re.search(r"\bfor\s*\(", lines[n - 1]))
        assert set(range(loop, number + 1)) & vectorised, f"{SOURCE.name}:{number} ({compiler} {' '.join(arch_flags)}): the loop " \
                                            f"calling exp_ps is not vectorised: {lines[number - 1].strip()}"
