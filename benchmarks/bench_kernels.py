"""What the compiled CPU kernels give on this CPU, and what they would give on an AVX2-only one.

Variants, each in its own process (the kernel library is chosen once per process):
- native: the kernels as users get them (-march=native, 512-bit vectors where the CPU has AVX-512);
- haswell: the same source built with MINDRLHF_KERNEL_FLAGS="-march=haswell" (AVX2 + FMA, no AVX-512), so an
  AVX-512 host shows what an AVX2 EPYC/Xeon runs;
- baseline: -march=x86-64 (SSE2 only), what a build without tuned flags gets;
- msops: no compiled kernels (MINDRLHF_COMPILED_KERNELS=0), MindSpore ops arranged around its slow CPU paths;
- stock: MindFormers' own layers (MINDRLHF_STOCK_KERNELS=1).
For each: the median time of each kernel's forward and backward at the tiny YAML's shape (16 rows of 256 tokens,
4 heads of 16; the compiled variants only), and the median step of the tutorial's reward_train.py on the tiny YAML
(--steps steps, first 10 dropped). Writes benchmarks/results/kernels.json with the CPU named.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from common import ROOT, TINY_CONFIG, TOKENIZER, TRAIN_JSONL, cpu_line, require_inputs, save

EXAMPLES = ROOT / "examples" / "reward_model_train_tutorial"
STEP_TIME = re.compile(r"per_step_time: (\d+)ms")
VARIANTS = {
    "native": {},
    "haswell": {"MINDRLHF_KERNEL_FLAGS": "-march=haswell"},
    "baseline": {"MINDRLHF_KERNEL_FLAGS": "-march=x86-64"},
    "msops": {"MINDRLHF_COMPILED_KERNELS": "0"},
    "stock": {"MINDRLHF_STOCK_KERNELS": "1"},
}


def kernel_times(repeats: int) -> dict:
    """Median ms of each compiled kernel, forward and backward, at the tiny shape (this process's build)."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor

    from mindrlhf.kernels import native
    from mindrlhf.kernels.cpu_speedups import FusedRMSNorm, FusedSwiGLU, RopeAttention

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    library = native.library("cpu_kernels")
    if not library:
        return {}
    import ctypes

    ctypes.CDLL(library).MindrlhfSetThreads(native.local_threads())
    rng = np.random.default_rng(0)
    rows, seq, heads, size, hidden, ffn = 16, 256, 4, 16, 64, 192

    def tensor(*shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32))

    q, k, v = tensor(rows, seq, heads * size), tensor(rows, seq, heads * size), tensor(rows, seq, heads * size)
    angles = np.arange(seq)[:, None] * (10000.0 ** (-np.arange(0, size, 2) / size))[None, :]
    angles = np.concatenate([angles, angles], axis=1).astype(np.float32)
    cos, sin = Tensor(np.cos(angles)[None, None]), Tensor(np.sin(angles)[None, None])
    mask = Tensor(np.zeros((rows, 1, 1, seq), np.float32))
    attention, norm, swiglu = RopeAttention(library), FusedRMSNorm(library, 1e-5), FusedSwiGLU(library)
    x, w, gate, up = tensor(rows * seq, hidden), tensor(hidden), tensor(rows * seq, ffn), tensor(rows * seq, ffn)
    out, stats = attention.forward_op(q, k, v, cos, sin, mask)
    calls = {
        "attention_forward": lambda: attention.forward_op(q, k, v, cos, sin, mask),
        "attention_backward": lambda: attention.backward_op(q, k, v, cos, sin, mask, out, stats, q),
        "rmsnorm_forward": lambda: norm.forward_op(x, w, norm.eps),
        "rmsnorm_backward": lambda: norm.backward_op(x, w, norm.eps, x),
        "swiglu_forward": lambda: swiglu.forward_op(gate, up),
        "swiglu_backward": lambda: swiglu.backward_op(gate, up, gate),
    }
    times = {}
    for name, call in calls.items():
        call()[0].asnumpy()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()[0].asnumpy()
            samples.append((time.perf_counter() - start) * 1000.0)
        times[name] = round(statistics.median(samples), 3)
    return {"library": os.path.basename(library), "ms": times}


def step_time(work: str, data: str, steps: int, env: dict) -> dict:
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["train_dataset_task"]["dataset_config"] = raw["train_dataset"]
    config = os.path.join(work, "tiny.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, allow_unicode=True)
    out = tempfile.mkdtemp(dir=work)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reward_train.py"), "--config", config, "--train_dataset",
                           data, "--output_dir", out, "--stop_step", str(steps)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"reward_train.py failed:\n{proc.stderr[-3000:]}")
    log = open(os.path.join(out, "log", "rank_0", "info.log"), encoding="utf-8").read()
    swapped = re.search(r"mindrlhf CPU kernels \(([^)]*)\): ([^\n]*)", log)
    ms_steps = [int(t) for t in STEP_TIME.findall(log)][10:]
    return {"median_step_ms": statistics.median(ms_steps) if ms_steps else None, "steps_timed": len(ms_steps),
            "kernels": swapped.group(0)[:200] if swapped else "stock layers"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=80, help="tiny training steps per variant (first 10 dropped)")
    parser.add_argument("--repeats", type=int, default=50, help="calls per kernel timing")
    parser.add_argument("--rounds", type=int, default=2, help="variants are run in turn this many times")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(kernel_times(args.repeats)))
        return 0
    require_inputs()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    work = tempfile.mkdtemp(prefix="bench_kernels_")
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MINDRLHF_KERNEL_FLAGS", "MINDRLHF_COMPILED_KERNELS", "MINDRLHF_STOCK_KERNELS")}
    base_env.update(PYTHONPATH=str(ROOT), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    data = os.path.join(work, "train.mindrecord")
    subprocess.run([sys.executable, str(EXAMPLES / "cvalues_comparison.py"), "--model", str(TOKENIZER), "--src_file",
                    str(TRAIN_JSONL), "--dst_file", data, "--seq_length", "256"], env=base_env, check=True,
                   capture_output=True)
    results = {"shape": "tiny YAML: 16 rows x 256 tokens, 4 heads of 16, hidden 64", "variants": {}}
    for round_ in range(args.rounds):  # in turn, so a slow minute does not land on one variant only
        for name in names:
            env = dict(base_env, **VARIANTS[name])
            entry = results["variants"].setdefault(name, {"env": VARIANTS[name], "rounds": []})
            measured = {}
            if name not in ("msops", "stock"):
                proc = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)],
                                      env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"kernel timing for {name} failed:\n{proc.stderr[-3000:]}")
                measured.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            measured.update(step_time(work, data, args.steps, env))
            entry["rounds"].append(measured)
            print(f"round {round_ + 1} {name:8s} step {measured['median_step_ms']} ms  {measured.get('ms', '')}",
                  flush=True)
    for name, entry in results["variants"].items():
        steps = [r["median_step_ms"] for r in entry["rounds"] if r["median_step_ms"] is not None]
        entry["median_step_ms"] = statistics.median(steps) if steps else None
        kernels = [r["ms"] for r in entry["rounds"] if "ms" in r]
        if kernels:
            entry["kernel_ms"] = {k: round(statistics.median(r[k] for r in kernels), 3) for k in kernels[0]}
    print(cpu_line())
    for name, entry in results["variants"].items():
        print(f"{name:8s} median step {entry['median_step_ms']} ms  kernels {entry.get('kernel_ms', '-')}")
    save("kernels", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
