"""Run every benchmark one after another (they must not share the CPU) and print the ratios."""
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for name in ("bench_convert.py", "bench_infer.py", "bench_train.py"):
    print(f"== {name}", flush=True)
    proc = subprocess.run([sys.executable, str(HERE / name)], cwd=HERE)
    if proc.returncode != 0:
        sys.exit(f"{name} failed with exit code {proc.returncode}")
print("== ratios")
for name in ("convert", "infer", "train"):
    data = json.loads((HERE / "results" / f"{name}.json").read_text())
    key = "speedup_real_tokens_per_s" if name == "train" else "speedup"
    print(f"{name:8s} {data[key]}x")
