"""Shared bits for the benchmarks: inputs from tests/data (shipped with the repository), timing, JSON results."""
import json
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


def require_inputs():
    for path in (TOKENIZER, TRAIN_JSONL, TEST_JSONL):
        if not path.exists():
            sys.exit(f"benchmark input {path} is missing (it ships in tests/data)")


@contextmanager
def timed(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - start


def save(name: str, result: dict):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"results: {path}")
    return path
