"""Shared paths and the expensive fixtures (a converted test set, one real tiny training run)."""
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Fixtures live in the repository (a fresh clone tests itself): the Llama 2 SentencePiece model and the
# CValues-format synthetic train/test splits (4,049 / 773 pairs).
DATA = ROOT / "tests" / "data"
TOKENIZER = DATA / "tokenizers" / "llama2" / "tokenizer.model"
TRAIN_JSONL = DATA / "cvalues_synth" / "train.jsonl"
TEST_JSONL = DATA / "cvalues_synth" / "test.jsonl"
CONFIGS = ROOT / "model_configs" / "llama2_config"
TINY_CONFIG = CONFIGS / "run_llama_2_tiny_rm_cpu.yaml"
CONFIG_7B = CONFIGS / "run_llama_2_7b_rm.yaml"
EXAMPLES = ROOT / "examples" / "reward_model_train_tutorial"
SCRIPTS = ROOT / "scripts"


# `make test` runs the suite on pytest-xdist workers, a module whole on one (--dist loadfile, so a module's fixtures
# are built once), and these modules first, longest first (from the suite's --durations), so that no worker is left
# with a long module at the end while the others wait; the rest keep their usual order.
LONGEST_FIRST = ("test_docs.py", "test_multirank.py", "test_lora_scoring.py", "test_rank_verdict.py",
                 "test_packed_train.py", "test_training.py", "test_packing_recipe.py", "test_resume.py",
                 "test_server.py", "test_packed_scoring.py", "test_lora_train.py", "test_backbones.py",
                 "test_packed_model.py", "test_demo.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def cli_env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("GLOG_v", "3")
    return env


def run_cli(script, *args, cwd=None, check=True, timeout=1800):
    """Run one of the tutorial scripts as a user would; returns the CompletedProcess."""
    cmd = [sys.executable, str(script)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def run_killed(script, point, *args, env=None):
    """The script run as a user would, killed (SIGKILL) at the named point of mindrlhf.io.kill_point; asserts the
    kill happened there."""
    from mindrlhf.io import KILL_AT

    cmd = [sys.executable, str(script)] + [str(a) for a in args]
    proc = subprocess.run(cmd, env={**cli_env(), **(env or {}), KILL_AT: point}, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == -9, f"not killed at {point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def run_main(script, *args, check=True):
    """The same script's main() called in this process, as its CLI would call it (argv, stdout, stderr, exit code),
    without a new interpreter importing MindSpore and MindFormers (seconds a run). For the many cases of one exit
    path: each CLI and exit path keeps at least one real run_cli run in the suite. Returns a CompletedProcess."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"_cli_{Path(script).stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import mindspore as ms

    argv = [str(a) for a in args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    mode = ms.get_context("mode")  # eval/infer set the YAML's mode: the tests after this one keep theirs
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            ms.set_context(mode=mode)
    proc = subprocess.CompletedProcess([str(script), *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(argv)} exited {code} (in-process)\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun(order, workers, log_dir, *node, port=None, timeout=900, prefix=()):
    """scripts/msrun_launcher.sh as a user runs it: one node (workers), or with node = (local_workers,
    master_addr, port, node_rank) one node of several. Returns a Popen when node is given (start all nodes,
    then wait), else the finished CompletedProcess. prefix: e.g. `ip netns exec NAME` to run it on a "host"."""
    args = [*prefix, "bash", str(SCRIPTS / "msrun_launcher.sh"), order, str(workers)]
    if node:
        args += [str(a) for a in node] + [str(log_dir)]
        return subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    args += [str(port or free_port()), str(log_dir)]
    return subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _encode(value):
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, subprocess.CompletedProcess):
        return {"__proc__": [value.args, value.returncode, value.stdout, value.stderr]}
    if isinstance(value, dict):
        return {key: _encode(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if "__path__" in value:
            return Path(value["__path__"])
        if "__proc__" in value:
            return subprocess.CompletedProcess(*value["__proc__"])
        return {key: _decode(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def shared_once(tmp_path_factory, name, build):
    """build(folder) run once per test run, for every module that needs it. Under pytest-xdist the first worker to
    ask builds it in the run's shared temporary folder while holding a lock; the others wait on the lock and read
    its recorded result (pytest-xdist's documented pattern), so no worker trains the same run twice. A failed
    build records nothing: the next worker to ask tries again and fails with its own error."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    done = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return _decode(json.loads(done.read_text(encoding="utf-8")))
        folder = shared / name
        if folder.exists():  # a failed build's leftovers
            shutil.rmtree(folder)
        folder.mkdir()
        result = build(folder)
        done.write_text(json.dumps(_encode(result)), encoding="utf-8")
        return result


@pytest.fixture(scope="module")
def pynative_mode():
    """PyNative for one module (the FlashAttention stand-in checks the values it is given), then back."""
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="session")
def test_mindrecord(tmp_path_factory):
    """The test split converted at seq 256, pad 2."""
    def build(folder):
        out = folder / "test_256.mindrecord"
        run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL,
                "--dst_file", out, "--seq_length", 256, "--pad_token_id", 2)
        return out

    return shared_once(tmp_path_factory, "test_mindrecord", build)


def split_by_prompt(src, seen, heldout, every=10):
    """Pairs of every `every`-th distinct prompt (sorted) go to heldout, the rest to seen: a split whose
    prompts training never shows (the shipped test split shares its prompts with the train split)."""
    lines = Path(src).read_text(encoding="utf-8").splitlines(keepends=True)
    prompts = sorted({json.loads(line)["prompt"] for line in lines})
    held = set(prompts[::every])
    Path(seen).write_text("".join(l for l in lines if json.loads(l)["prompt"] not in held), encoding="utf-8")
    Path(heldout).write_text("".join(l for l in lines if json.loads(l)["prompt"] in held), encoding="utf-8")


SEEN_PAIRS, HELDOUT_PAIRS = 3639, 410  # of the 4,049 train pairs; 23 of 224 prompts held out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One epoch of the tiny CPU config over the train pairs whose prompts are not held out (8 pairs a step,
    a checkpoint every 100 steps), via the CLI."""
    def build(work):
        seen, heldout = work / "seen.jsonl", work / "heldout.jsonl"
        split_by_prompt(TRAIN_JSONL, seen, heldout)
        data = work / "train_256.mindrecord"
        run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", seen,
                "--dst_file", data, "--seq_length", 256, "--pad_token_id", 2)
        out = work / "output"
        run_cli(EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset", data,
                "--output_dir", out, "--batch_size", 8, "--save_steps", 100, cwd=work)
        summary = json.loads((out / "train_summary.json").read_text())
        return {"work": work, "data": data, "output": out, "summary": summary, "heldout": heldout,
                "checkpoint_root": out / "checkpoint", "log": out / "log" / "rank_0" / "info.log"}

    return shared_once(tmp_path_factory, "trained_run", build)


@pytest.fixture(scope="session")
def trained_eval(trained_run, tmp_path_factory):
    """reward_eval.py on trained_run's newest checkpoint over the whole test split (jsonl + tokenizer), with
    per-pair scores: shared by the tests that need the padded run's accuracy or scores."""
    def build(out):
        proc = run_cli(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG,
                       "--distributed_ckpt_path", trained_run["checkpoint_root"], "--eval_dataset", TEST_JSONL,
                       "--tokenizer", TOKENIZER, "--output_file", out / "eval.json",
                       "--scores_file", out / "scores.jsonl")
        return {"proc": proc, "results": json.loads((out / "eval.json").read_text()),
                "scores": [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]}

    return shared_once(tmp_path_factory, "trained_eval", build)


LORA_CONFIG = CONFIGS / "run_llama_2_tiny_lora_rm_cpu.yaml"
LORA_EVERY = 8  # 1 train pair in 8: 507 pairs, 63 steps, 0.996 on the test split (whole split, 506 steps: 0.999)


def random_base(path, config=LORA_CONFIG, **changes):
    """A random backbone saved as a file (model.* only), as a pretrained model would be: the model of the YAML
    without its pet_config."""
    import mindspore as ms

    from families import build_reward_model

    ms.set_seed(0)
    net = build_reward_model(config, pet_config=None, **changes)
    ms.save_checkpoint([{"name": p.name, "data": p} for p in net.get_parameters() if p.name.startswith("model.")],
                       str(path))
    return path


@pytest.fixture(scope="session")
def lora_epoch(tmp_path_factory):
    """One epoch of the tiny LoRA YAML over one train pair in LORA_EVERY, from a random base file, a checkpoint
    every 16 steps (16, 32, 48, 63: all kept), then evaluated on the whole test split. Shared by test_lora_train
    (learning, frozen base, resume, msrun) and test_lora_scoring (the run's three forms scored downstream)."""
    def build(work):
        base = random_base(work / "base.ckpt")
        subset = work / "train_subset.jsonl"
        rows = TRAIN_JSONL.read_text(encoding="utf-8").splitlines(keepends=True)
        subset.write_text("".join(rows[::LORA_EVERY]), encoding="utf-8")
        data = work / "train_256.mindrecord"
        run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", subset,
                 "--dst_file", data, "--seq_length", 256, "--pad_token_id", 2)
        out = work / "output"
        run_cli(EXAMPLES / "reward_train.py", "--config", LORA_CONFIG, "--train_dataset", data,
                "--output_dir", out, "--load_checkpoint", base, "--save_steps", 16, cwd=work)
        run_cli(EXAMPLES / "reward_eval.py", "--config", LORA_CONFIG, "--distributed_ckpt_path", out / "checkpoint",
                "--eval_dataset", TEST_JSONL, "--tokenizer", TOKENIZER, "--batch_size", 32,
                "--output_file", work / "eval.json", cwd=work)
        return {"work": work, "base": base, "data": data, "out": out,
                "summary": json.loads((out / "train_summary.json").read_text()),
                "eval": json.loads((work / "eval.json").read_text()), "log": out / "log" / "rank_0" / "info.log"}

    return shared_once(tmp_path_factory, "lora_epoch", build)
