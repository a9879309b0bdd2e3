"""Importing mindrlhf.training.registry registers every YAML type (plain `import mindrlhf` and the tools that need no model
stay free of MindFormers); the 7B Ascend YAML resolves and its model builds on CPU."""
import subprocess
import sys

import pytest
import yaml

from conftest import CONFIG_7B, TINY_CONFIG, cli_env


def run_python(code, timeout=300):
    """A fresh interpreter (nothing imported yet) running `code`; it must exit 0."""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_registers_everything():
    code = ("import mindrlhf.training.registry\n"
            "from mindformers.tools.register import MindFormerRegister as R, MindFormerModuleType as T\n"
            "for t, n in [(T.MODELS, 'LlamaRewardModel'), (T.DATASET, 'RewardModelDataset'),\n"
            "             (T.WRAPPER, 'RewardTrainOneStepCell'), (T.LOSS, 'CompareLoss'),\n"
            "             (T.OPTIMIZER, 'FP32StateAdamWeightDecay')]:\n"
            "    cls = R.get_cls(t, n)\n"
            "    assert cls.__module__.startswith('mindrlhf.'), (n, cls)\n"
            "print('registered')\n")
    proc = run_python(code)
    assert proc.stdout.strip() == "registered"


def test_light_tools_do_not_import_mindformers():
    code = ("import sys\n"
            "import mindrlhf\n"
            "import mindrlhf.data.convert, mindrlhf.data.tokenizer, mindrlhf.data.buckets, mindrlhf.tools.loss_plot\n"
            "import mindrlhf.tools.hccl_tools, mindrlhf.cli\n"
            "heavy = sorted(m for m in ('mindformers', 'mindrlhf.training.registry') if m in sys.modules)\n"
            "print(heavy)\n"
            "mindrlhf.LlamaRewardModel  # first use registers\n"
            "print('mindformers' in sys.modules, 'mindrlhf.training.registry' in sys.modules)\n")
    proc = run_python(code)
    assert proc.stdout.split() == ["[]", "True", "True"]


TYPE_SECTIONS = {
    ("model", "arch"): "MODELS", ("model", "model_config"): "CONFIG", ("train_dataset_task",): "DATASET",
    ("eval_dataset_task",): "DATASET", ("runner_wrapper",): "WRAPPER", ("optimizer",): "OPTIMIZER",
    ("lr_schedule",): "LR", ("runner_wrapper", "scale_sense"): "WRAPPER",
    ("train_dataset", "data_loader"): "DATASET_LOADER", ("trainer",): "TRAINER",
}


def _types(config_path):
    raw = yaml.safe_load(open(config_path, encoding="utf-8"))
    found = []
    for path, kind in TYPE_SECTIONS.items():
        node = raw
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and "type" in node:
            found.append((kind, node["type"]))
    for callback in raw.get("callbacks", []):
        found.append(("CALLBACK", callback["type"]))
    return found


def test_every_yaml_type_resolves():
    import mindrlhf.training.registry  # noqa: F401
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    for config in (CONFIG_7B, TINY_CONFIG):
        types = _types(config)
        assert len(types) >= 10, types
        for kind, name in types:
            if kind == "DATASET_LOADER" and name == "MindDataset":
                continue  # a mindspore.dataset class, not a registry entry
            assert MindFormerRegister.get_cls(getattr(MindFormerModuleType, kind), name), (config.name, kind, name)


def test_production_config_sets_every_section_explicitly():
    from mindrlhf.training.config import REQUIRED_SECTIONS, check_sections, load_config

    config = load_config(str(CONFIG_7B))
    check_sections(str(CONFIG_7B))
    assert set(REQUIRED_SECTIONS) <= set(config.keys())
    assert config.model.arch.type == "LlamaRewardModel"
    assert config.train_dataset_task.type == "RewardModelDataset"
    assert config.optimizer.type == "FP32StateAdamWeightDecay"
    assert config.lr_schedule.learning_rate >= 1e-6  # not the tutorial's 8e-8
    mc = config.model.model_config
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.seq_length, mc.vocab_size) == (4096, 32, 32, 4096, 32000)


@pytest.mark.slow
def test_7b_model_builds_on_cpu_with_one_layer():
    """The 7B width (hidden 4096, vocab 32000, FFN from multiple_of 256) with num_layers overridden to 1.

    Parameter count = embedding + 1 layer (4 attention + 3 FFN matrices + 2 norms) + final norm + value head.
    """
    code = f"""
import mindspore as ms
import mindrlhf.training.registry
from mindformers import LlamaConfig
from mindrlhf.training.config import load_config
from mindrlhf.model.llama_reward import LlamaRewardModel
ms.set_context(mode=1, device_target='CPU')
cfg = dict(load_config({str(CONFIG_7B)!r}).model.model_config)
cfg.pop('type'); cfg.update(num_layers=1, use_flash_attention=False, fused_rms_norm=False, seq_length=64)
model = LlamaRewardModel(LlamaConfig(**cfg))
shapes = {{p.name: p.shape for p in model.get_parameters()}}
assert shapes['model.tok_embeddings.embedding_weight'] == (32000, 4096), shapes
assert shapes['model.layers.0.attention.wq.weight'] == (4096, 4096)
assert shapes['model.layers.0.feed_forward.w1.weight'] == (11008, 4096)
assert shapes['v_head.weight'] == (1, 4096)
assert not any(n.startswith('lm_head') for n in shapes)
print(sum(p.size for p in model.get_parameters()))
"""
    proc = run_python(code, timeout=900)
    assert int(proc.stdout.strip().splitlines()[-1]) == 32000 * 4096 + 4 * 4096 * 4096 + 3 * 4096 * 11008 + 3 * 4096 + 4096
