"""LoRA reward models train for real (pet_config): from base weights in a file, a tiny run learns the ranking,
changes only its LoRA matrices and value head, resumes bit for bit, trains data-parallel under msrun, starts from
a Hugging Face import; bad settings exit 2; the CPU SwiGLU kernel applies w1's SiLU once under LoRA."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

import mindspore as ms

from conftest import DATA, EXAMPLES, ROOT, SCRIPTS, TOKENIZER, TRAIN_JSONL, cli_env, msrun, run_cli, run_main
from test_resume import RUN_BOOKKEEPING, weights

slow = pytest.mark.slow  # model training; the checks of settings and of the SiLU are fast
TRAIN = EXAMPLES / "reward_train.py"
LORA = ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_lora_rm_cpu.yaml"
QWEN_LORA = ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_tiny_lora_rm_cpu.yaml"
LLAMA3_LORA = ROOT / "model_configs" / "llama3_config" / "run_llama_3_tiny_lora_rm_cpu.yaml"


def is_lora(name):
    return name.startswith("model.") and name.endswith(("mindpet_delta_lora_a", "mindpet_delta_lora_b"))


def by_step(out, rank=0):
    """{global step: checkpoint} of a run's rank."""
    return {int(weights(p)["global_step"].reshape(-1)[0]): p
            for p in (out / "checkpoint" / f"rank_{rank}").glob("*.ckpt")}


def write_yaml(path, base=LORA, **model_changes):
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    for key, value in model_changes.items():
        if key == "pet_config":
            raw["model"]["model_config"]["pet_config"].update(value)
        else:
            raw["model"]["model_config"][key] = value
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def lora_run(lora_epoch):
    """conftest's lora_epoch (shared with test_lora_scoring) with its checkpoints by step."""
    return dict(lora_epoch, checkpoints=by_step(lora_epoch["out"]))


@slow
def test_a_lora_run_from_a_base_file_learns_the_ranking(lora_run):
    assert sorted(lora_run["checkpoints"]) == [16, 32, 48, 63]
    result = lora_run["eval"]["checkpoints"][-1]
    assert result["pairs"] == 773
    print(f"LoRA, 63 steps from a random base: accuracy {result['accuracy']:.4f} on the test split")
    assert result["accuracy"] >= 0.95


@slow
def test_only_lora_and_the_value_head_change(lora_run):
    base = weights(lora_run["base"])
    first, last = (weights(lora_run["checkpoints"][step]) for step in (16, 63))
    for name, value in base.items():  # every frozen tensor: bit for bit the base file's
        np.testing.assert_array_equal(last[name], value, err_msg=name)
    lora = sorted(n for n in last if is_lora(n))
    assert len(lora) == 28  # 7 projections x 2 layers x (A, B)
    for name in lora + ["v_head.weight"]:
        assert name not in base
        if name.endswith("lora_b") or name == "v_head.weight":
            assert not np.array_equal(first[name], last[name]), f"{name} did not train"
    assert all(np.abs(last[n]).max() > 0 for n in lora if n.endswith("lora_b"))  # B starts at zero
    params = {n for n in last if n.startswith(("model.", "v_head."))}
    assert {n[len("adam_m."):] for n in last if n.startswith("adam_m.")} == set(lora) | {"v_head.weight"}
    assert params == set(base) | set(lora) | {"v_head.weight"}


@slow
def test_the_log_names_trainable_and_frozen_parameter_counts(lora_run):
    last = weights(lora_run["checkpoints"][63])
    sizes = {n: v.size for n, v in last.items() if n.startswith(("model.", "v_head."))}
    trainable = sum(s for n, s in sizes.items() if is_lora(n) or n.startswith("v_head."))
    frozen = sum(sizes.values()) - trainable
    line = re.search(r"LoRA rank 8 alpha 16 dropout 0 on wq,wk,wv,wo,w1,w2,w3 \(14 projections\): ([\d,]+) "
                     r"parameters train \(([\d,]+) LoRA \+ ([\d,]+) value head\), ([\d,]+) frozen",
                     lora_run["log"].read_text(encoding="utf-8"))
    assert line, "no LoRA line in the training log"
    counts = [int(g.replace(",", "")) for g in line.groups()]
    assert counts == [trainable, trainable - 64, 64, frozen]


@slow
def test_resume_is_bit_exact(lora_run, tmp_path):
    """16 steps, stop, resume to 32: the uninterrupted run's step-32 checkpoint bit for bit (optimizer state too;
    --stop_step leaves the learning-rate schedule the whole epoch's)."""
    out = tmp_path / "out"
    common = ["--config", LORA, "--train_dataset", lora_run["data"], "--output_dir", out, "--save_steps", 16]
    run_cli(TRAIN, *common, "--load_checkpoint", lora_run["base"], "--stop_step", 16)
    run_cli(TRAIN, *common, "--resume", "True", "--load_checkpoint", out / "checkpoint", "--stop_step", 32)
    resumed, straight = weights(by_step(out)[32]), weights(lora_run["checkpoints"][32])
    assert set(resumed) == set(straight) and any(n.startswith("adam_v.") and is_lora(n[7:]) for n in resumed)
    for name in sorted(set(straight) - RUN_BOOKKEEPING):
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


# runs a CLI with mindrlhf.model.lora.lora_settings counted: the calling modules go to $LORA_SETTINGS_CALLERS
COUNTED = """import atexit, os, runpy, sys
import mindrlhf.model.lora as lora
real, callers = lora.lora_settings, []
def counted(*args, **kwargs):
    callers.append(sys._getframe(1).f_globals["__name__"])
    return real(*args, **kwargs)
lora.lora_settings = counted
atexit.register(lambda: open(os.environ["LORA_SETTINGS_CALLERS"], "w").write("\\n".join(callers)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@slow
def test_a_resumed_run_names_its_base_weights_and_derives_lora_once(lora_run, tmp_path):
    """2 steps from the base file, resumed to 4: the resumed run's adapter names the base file as the first run's
    does (before: base_path empty, the resumed command names no base file), and the trainer derives the LoRA
    settings once a run (before: three times, the last after training)."""
    from mindrlhf.checkpoints.adapters import read_adapter

    out, callers = tmp_path / "out", tmp_path / "callers.txt"
    common = ["--config", LORA, "--train_dataset", lora_run["data"], "--output_dir", out, "--save_steps", 2]
    run_cli(TRAIN, *common, "--load_checkpoint", lora_run["base"], "--stop_step", 2)
    first = json.loads((out / "train_summary.json").read_text())["lora"]
    args = [TRAIN, *common, "--resume", "True", "--load_checkpoint", out / "checkpoint", "--stop_step", 4]
    proc = subprocess.run([sys.executable, "-c", COUNTED, *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(cli_env(), LORA_SETTINGS_CALLERS=str(callers)), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((out / "train_summary.json").read_text())["lora"]
    assert first["base_path"] == resumed["base_path"] == str(lora_run["base"])
    _, meta = read_adapter(resumed["adapter"])
    assert meta["step"] == 4 and meta["base_path"] == str(lora_run["base"])
    assert meta["base_sha256"] == read_adapter(first["adapter"])[1]["base_sha256"]
    assert json.loads((out / "checkpoint" / "lora.json").read_text())["base_path"] == str(lora_run["base"])
    assert callers.read_text().split().count("mindrlhf.training.trainer") == 1


def test_a_run_resumed_from_before_lora_json_named_the_base_finds_it_in_its_adapters(tmp_path):
    """A run whose lora.json holds the settings alone (as written before it named the base): the resumed run takes
    the base path from the newest adapter of that run that names one."""
    from mindrlhf.checkpoints import adapters
    from mindrlhf.checkpoints.adapters import RUN_LORA_FILE, write_run_lora

    settings = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ".*wq", "targets": ["wq"]}
    old = tmp_path / "old" / "checkpoint"
    old.mkdir(parents=True)
    (old / RUN_LORA_FILE).write_text(json.dumps(settings))
    (tmp_path / "old" / "adapter").mkdir()
    head = {"v_head.weight": np.zeros((1, 4), np.float32)}
    for step, base in ((2, "/data/base.ckpt"), (3, "")):  # the newest names none (made without --base_path)
        adapters.write_adapter(str(tmp_path / "old" / "adapter" / f"run_{step}.safetensors"), head,
                           adapters.adapter_metadata(settings, "0" * 64, step, "0" * 64, base))
    new = tmp_path / "new" / "checkpoint"
    assert write_run_lora(str(new), settings, str(old)) == "/data/base.ckpt"
    assert json.loads((new / RUN_LORA_FILE).read_text())["base_path"] == "/data/base.ckpt"
    assert write_run_lora(str(tmp_path / "random" / "checkpoint"), settings) == ""


@slow
def test_data_parallel_under_msrun_keeps_the_base_and_agrees_across_ranks(lora_run, tmp_path):
    out = tmp_path / "output"
    order = " ".join(map(str, [TRAIN, "--config", LORA, "--train_dataset", lora_run["data"], "--output_dir", out,
                               "--use_parallel", "True", "--batch_size", 4, "--save_steps", 4, "--stop_step", 4,
                               "--load_checkpoint", lora_run["base"]]))
    proc = msrun(order, 2, tmp_path / "log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = weights(lora_run["base"])
    ranks = [weights(by_step(out, r)[4]) for r in (0, 1)]
    trained = [n for n in ranks[0] if is_lora(n) or n.startswith("v_head.")]
    assert len(trained) == 29
    for name, value in base.items():
        for r in (0, 1):
            np.testing.assert_array_equal(ranks[r][name], value, err_msg=f"rank {r}: {name}")
    for name in trained:  # gradients all-reduced: the replicas agree bit for bit
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    assert all(np.abs(ranks[0][n]).max() > 0 for n in trained if n.endswith("lora_b"))


class InVocabulary:
    """The Llama 2 tokenizer's ids folded into the tiny Hugging Face fixtures' 256 (3..255; 0 stays the pad)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab_size, self.default_pad_id = tokenizer, 256, 0

    def encode(self, texts, special_tokens=True):
        return [[3 + i % 253 for i in row] for row in self.tokenizer.encode(texts, special_tokens)]


@slow
def test_from_a_hugging_face_import(tmp_path):
    """Qwen2.5 (q/k/v biases, tied embeddings) imported by convert_weight.py, then a few LoRA steps: the
    imported tensors stay as imported, LoRA and the value head train."""
    from mindrlhf.data.convert import convert_pairs
    from mindrlhf.data.pairs import read_pairs
    from mindrlhf.data.tokenizer import load_tokenizer

    config = write_yaml(tmp_path / "qwen_lora.yaml", QWEN_LORA, vocab_size=256, intermediate_size=128)
    imported = tmp_path / "qwen2_5.ckpt"
    run_main(SCRIPTS / "convert_weight.py", "--input_path", DATA / "hf_models" / "qwen2_5", "--output_path",
             imported, "--config", config)
    pairs = list(read_pairs(str(TRAIN_JSONL)))[::64]
    data = tmp_path / "train.mindrecord"
    convert_pairs(pairs, InVocabulary(load_tokenizer(str(TOKENIZER))), str(data), 128, pad_token_id=0,
                  progress=False)
    out = tmp_path / "out"
    run_cli(TRAIN, "--config", config, "--train_dataset", data, "--output_dir", out, "--load_checkpoint",
            imported, "--batch_size", 4, "--stop_step", 3, "--save_steps", 3)
    start, end = weights(imported), weights(by_step(out)[3])
    assert "model.layers.0.attention.wq.bias" in start and "v_head.weight" in start
    for name, value in start.items():
        if name.startswith("model."):
            np.testing.assert_array_equal(end[name], value, err_msg=name)
    assert not np.array_equal(end["v_head.weight"], start["v_head.weight"])
    assert all(np.abs(end[n]).max() > 0 for n in end if is_lora(n) and n.endswith("lora_b"))


@pytest.mark.parametrize("changes,expected", [
    ({"pet_config": {"target_modules": ".*q_proj|.*gate"}},
     "target_modules: '.*q_proj|.*gate' matches none of the projections"),
    ({"qkv_concat": True}, "model_config.qkv_concat: True fuses into one projection that LoRA cannot reach"),
    ({"pet_config": {"lora_rnak": 4}}, "unknown key(s) ['lora_rnak']"),
], ids=["pattern-matches-nothing", "qkv-concat", "unknown-key"])
def test_bad_lora_settings_exit_2_naming_the_field(tmp_path, changes, expected):
    config = write_yaml(tmp_path / "bad.yaml", **changes)
    proc = run_main(TRAIN, "--config", config, "--train_dataset", tmp_path / "none.mindrecord", "--output_dir",
                    tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and str(config) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", [LORA, LLAMA3_LORA, QWEN_LORA], ids=lambda p: p.parent.name)
def test_every_familys_lora_yaml_builds_lora_on_its_seven_projections(config):
    """Each family's tiny LoRA YAML: every projection of every layer a LoRA layer (Qwen2.5's q/k/v keep their
    biases), and only LoRA and the value head trainable."""
    from families import build_reward_model

    net = build_reward_model(config)
    layers = [cell for _, cell in net.cells_and_names() if type(cell).__name__ == "LoRADense"]
    assert len(layers) == 7 * len(net.model.layers) == 14
    trainable = {p.name for p in net.trainable_params()}
    assert trainable == {p.name for p in net.get_parameters() if is_lora(p.name)} | {"v_head.weight"}
    assert len(trainable) == 29 and net.lora_counts["layers"] == 14
    biases = {p.name for p in net.get_parameters() if p.name.endswith("attention.wq.bias")}
    assert bool(biases) == (config == QWEN_LORA) and not biases & trainable


@pytest.mark.parametrize("config", sorted(ROOT.glob("model_configs/*/run_*_7b_rm.yaml")), ids=lambda p: p.name)
def test_the_7b_yamls_commented_lora_block_is_valid_as_uncommented(config, tmp_path):
    """Each 7B YAML carries its pet_config commented out: uncommented as the comment says, its projections are
    reachable (qkv_concat/ffn_concat off) and every key is one LoRA takes."""
    from mindrlhf.model.lora import lora_settings
    from mindrlhf.training.config import load_config

    text = config.read_text(encoding="utf-8")
    block = re.search(r"\n    # pet_config:\n((?:    #   .*\n)+)", text)
    assert block, f"{config.name}: no commented-out pet_config block"
    uncommented = text.replace(block.group(0), "\n    pet_config:\n" + block.group(1).replace("    #   ", "      "))
    (tmp_path / config.name).write_text(uncommented, encoding="utf-8")
    settings = lora_settings(load_config(str(tmp_path / config.name)).model.model_config)
    assert settings["targets"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"] and settings["dropout"] == 0.0


# ---- the SiLU trap -----------------------------------------------------------------------------------------

def build(monkeypatch, stock, lora=True):
    from families import build_reward_model

    if stock:
        monkeypatch.setenv("MINDRLHF_STOCK_KERNELS", "1")
    else:
        monkeypatch.delenv("MINDRLHF_STOCK_KERNELS", raising=False)
        monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1")
    ms.set_seed(0)
    changes = {} if lora else {"pet_config": None}
    net = build_reward_model(LORA, seq_length=32, batch_size=2, **changes)
    net.set_train(False)
    return net


def token_rewards(net, params):
    ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(v), n) for n, v in params.items()}, strict_load=True)
    ids = np.random.default_rng(0).integers(3, 32000, size=(4, 32)).astype(np.int32)
    return net.token_rewards(ms.Tensor(ids)).asnumpy()


def test_swiglu_kernel_applies_silu_once_under_lora(monkeypatch):
    """LoRA on w1 before the CPU SwiGLU swap (as LlamaRewardModel does) gives the stock MindFormers model's rewards;
    the other order (swap, then LoRA: the LoRA layer takes w1's SiLU and switches it back on, the kernel applies it
    too) does not, and the comparison tells."""
    from mindrlhf.kernels import native
    from mindrlhf.model.lora import apply_lora, lora_settings
    from mindrlhf.training.config import load_config

    if not native.library("cpu_kernels"):
        pytest.skip("no C++ compiler here: no SwiGLU kernel to swap in")
    stock = build(monkeypatch, stock=True)
    fast = build(monkeypatch, stock=False)
    w1 = fast.model.layers[0].feed_forward.w1
    assert type(w1).__name__ == "LoRADense" and not w1.activation_flag
    assert type(fast.model.layers[0].feed_forward).__name__.startswith("Cpu")
    assert type(stock.model.layers[0].feed_forward).__name__ == "LlamaFeedForward"
    assert stock.model.layers[0].feed_forward.w1.activation_flag
    rng = np.random.default_rng(1)
    params = {p.name: p.asnumpy() for p in stock.get_parameters()}
    for name in params:  # B is zero at the start: give every LoRA delta a value, so w1's path carries LoRA
        if name.endswith("lora_b"):
            params[name] = (rng.standard_normal(params[name].shape) * 0.05).astype(np.float32)
    expected = token_rewards(stock, params)
    np.testing.assert_allclose(token_rewards(fast, params), expected, rtol=0, atol=1e-5)

    wrong = build(monkeypatch, stock=False, lora=False)  # swapped first...
    apply_lora(wrong, lora_settings(load_config(str(LORA)).model.model_config), log=lambda *_: None)  # ...then LoRA
    assert wrong.model.layers[0].feed_forward.w1.activation_flag  # SiLU in the layer, and in the kernel
    assert np.abs(token_rewards(wrong, params) - expected).max() > 1e-3
