"""Shared bits for the benchmarks: inputs from tests/data (shipped with the repository), timing, JSON results."""
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data"
TOKENIZER = DATA / "tokenizers" / "llama2" / "tokenizer.model"
TRAIN_JSONL = DATA / "cvalues_synth" / "train.jsonl"
TEST_JSONL = DATA / "cvalues_synth" / "test.jsonl"
TINY_CONFIG = ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_rm_cpu.yaml"
RESULTS = ROOT / "benchmarks" / "results"
# The packed dataset's line on rank 0 (mindrlhf.data.dataset): mode, loss, pairs, steps, rows, row tokens, steps a
# rank, filler share in %.
# the packed dataset's line (pack_steps batch_size): mode, loss, pairs, steps, pairs a rank, ranks, row tokens,
# row counts
PACKING_LINE = re.compile(r"packing (\w+) \((\w+)\): (\d+) pairs -> (\d+) steps of (\d+) pairs a rank x (\d+) "
                          r"rank\(s\), rows of (\d+) tokens, \[([\d, ]+)\] rows a step")


def require_inputs():
    for path in (TOKENIZER, TRAIN_JSONL, TEST_JSONL):
        if not path.exists():
            sys.exit(f"benchmark input {path} is missing (it ships in tests/data)")


@contextmanager
def timed(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - start


def cpu_name() -> dict:
    """The CPU's model name, family, cores and vector extensions, as /proc/cpuinfo gives them: every figure is
    that machine's (our lead over a peer differs between an AVX-512 and an AVX2 CPU)."""
    info = {"model": "unknown", "vector_extensions": [], "cores": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    info["model"] = (model.group(1).strip() if model else "unknown") + (f" (family {family.group(1)})" if family else "")
    if flags:
        info["vector_extensions"] = sorted(f for f in flags.group(1).split()
                                           if re.match(r"(avx|sse4|fma|amx|sve|asimd|neon)", f))
    return info


def cpu_line(info: dict = None) -> str:
    info = info or cpu_name()
    return f"CPU: {info['model']}, {info.get('cores')} cores, {' '.join(info['vector_extensions']) or 'no vector flags'}"


def save(name: str, result: dict):
    """Write benchmarks/results/<name>.json, naming the CPU the figures were measured on."""
    result.setdefault("cpu", cpu_name())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(cpu_line(result["cpu"]))
    print(f"results: {path}")
    return path
