"""What a packed row costs the compiled attention kernel: the forward of one row of S tokens (D 64, 2 heads, one
kernel thread) as one span of S, as 8 spans of S/8 (the kernel skips keys outside each query's span, so a packed
row should cost about the sum of its spans' squares: 1/8 here), and with the padded path's per-key mask (what one
span of S computes). Best of --repeats calls each. Writes benchmarks/results/packed_attention.json naming the CPU.
"""
import argparse
import ctypes
import os
import sys
import time

import numpy as np

from common import ROOT, cpu_line, save

sys.path.insert(0, str(ROOT))


def masks(seq, spans):
    """The kernel's packed mask (1, 2, 1, S) of positions and layout codes for `spans` equal spans of a row."""
    width = seq // spans
    positions = np.arange(seq) % width
    codes = (np.arange(seq) // width + 1) * 8  # segment k, kind 0
    return np.stack([positions, codes])[None, :, None, :].astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--spans", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import mindspore as ms
    from mindspore import Tensor

    from mindrlhf.kernels import native
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    library = native.library("cpu_kernels")
    if library is None:
        sys.exit("no compiled kernels here (no C++ compiler, or MINDRLHF_COMPILED_KERNELS=0)")
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    seq, size, heads = args.seq, 64, 2
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, seq, heads * size)).astype(np.float32) for _ in range(3))
    angles = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(0, size, 2) / size)[None]
    angles = np.concatenate([angles, angles], -1)
    cos, sin = (f(angles).reshape(1, 1, seq, size).astype(np.float32) for f in (np.cos, np.sin))
    cases = {f"1 span of {seq}": masks(seq, 1), f"{args.spans} spans of {seq // args.spans}": masks(seq, args.spans),
             "padded per-key mask": np.zeros((1, 1, 1, seq), np.float32)}
    net = RopeAttention(library)
    ctypes.CDLL(library).MindrlhfSetThreads(1)
    times = {}
    for name, mask in cases.items():
        tensors = [Tensor(x) for x in (q, k, v, cos, sin, mask)]
        net(*tensors)[0].asnumpy()  # compile
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            net(*tensors)[0].asnumpy()
            best = min(best, time.perf_counter() - start)
        times[name] = round(best * 1e3, 3)
    names = list(cases)
    ratio = times[names[1]] / times[names[0]]
    save("packed_attention", {"seq": seq, "head_dim": size, "heads": heads, "threads": 1, "repeats": args.repeats,
                              "forward_ms_best": times, "spans_over_one_span": round(ratio, 3),
                              "load_average": os.getloadavg()})
    print(f"{names[1]} / {names[0]}: {ratio:.3f}x; {cpu_line()}")


if __name__ == "__main__":
    main()
