"""Run every benchmark one after another (they must not share the CPU) and print the ratios."""
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for name in ("bench_convert.py", "bench_convert_tokenizers.py", "bench_infer.py", "bench_train.py", "bench_packing.py",
             "bench_server.py"):
    print(f"== {name}", flush=True)
    proc = subprocess.run([sys.executable, str(HERE / name)], cwd=HERE)
    if proc.returncode != 0:
        sys.exit(f"{name} failed with exit code {proc.returncode}")
# Optional: the peer comparison (TRL) needs its own interpreter, .venv-peer (`make peer-venv`); without it
# bench_peer.py prints how to create it and exits 0, and its ratio is left out below.
PEER_PYTHON = HERE.parent / ".venv-peer" / "bin" / "python"
print("== bench_peer.py (optional)", flush=True)
if PEER_PYTHON.exists():
    proc = subprocess.run([sys.executable, str(HERE / "bench_peer.py"), "--peer_python", str(PEER_PYTHON)], cwd=HERE)
    if proc.returncode != 0:
        sys.exit(f"bench_peer.py failed with exit code {proc.returncode}")
else:
    print(f"skipped: no {PEER_PYTHON} (create it with `make peer-venv`)")
print("== ratios")
for name in ("convert", "convert_tokenizers", "infer", "train", "server"):
    data = json.loads((HERE / "results" / f"{name}.json").read_text())
    key = "speedup_real_tokens_per_s" if name == "train" else "speedup"
    print(f"{name:18s} {data[key]}x")
packing = json.loads((HERE / "results" / "packing.json").read_text())["runs"]
for run in ("buckets", "packed"):
    print(f"{'packing ' + run:18s} {packing[run]['speedup_real_tokens_per_s_vs_fixed']}x real tokens/s vs fixed 4096, "
          f"padding {packing[run]['padding_share']:.1%}")
if PEER_PYTHON.exists() and (HERE / "results" / "peer.json").exists():
    peer = json.loads((HERE / "results" / "peer.json").read_text())
    for shape, r in peer["shapes"].items():
        print(f"{'peer ' + shape + ' (tokens/s ours/trl)':18s} {r['ratio_real_tokens_per_s_ours_over_trl']}x")
