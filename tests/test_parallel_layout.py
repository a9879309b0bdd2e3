"""The 8-NPU layout, read back from the built model: every primitive of the value head, the score gather and
CompareLoss carries a shard strategy for the 7B YAML's dp x mp, and head + loss sit on the last pipeline stage.

CPU cannot compile a semi-auto parallel graph (`Invalid backend: CPU`), so these strategies are checked as
configured, not executed; the README says which parts of the 7B path run in tests and which do not.
"""
import json
import subprocess
import sys

import pytest

from conftest import CONFIG_7B, cli_env

LAYOUT = f"""
import json, sys
import mindspore as ms
import mindrlhf.training.registry
from mindformers import LlamaConfig
from mindformers.modules import TransformerOpParallelConfig
from mindrlhf.training.config import load_config
from mindrlhf.model.llama_reward import LlamaRewardModel
ms.set_context(mode=1, device_target='CPU')
config = load_config({str(CONFIG_7B)!r})
parallel = dict(config.parallel_config)
parallel.update(json.loads(sys.argv[1]))
cfg = dict(config.model.model_config)
cfg.pop('type')
cfg.update(num_layers=2, hidden_size=64, num_heads=8, seq_length=64, use_flash_attention=False, fused_rms_norm=False,
           parallel_config=TransformerOpParallelConfig(**{{k: parallel[k] for k in (
               'data_parallel', 'model_parallel', 'pipeline_stage', 'micro_batch_num', 'vocab_emb_dp')}}))
net = LlamaRewardModel(LlamaConfig(**cfg))
strategies = {{}}
for prefix, cell in (('loss', net.loss), ('model', net)):
    for name in dir(cell):
        prim = getattr(cell, name, None)
        if isinstance(prim, ms.ops.Primitive) and 'in_strategy' in prim.attrs:
            strategies[prefix + '.' + name] = [list(s) for s in prim.attrs['in_strategy']]
strategies['v_head.matmul'] = [list(s) for s in net.v_head.matmul.attrs['in_strategy']]
stage = lambda cell: getattr(cell, '_pipeline_stage', None)
print(json.dumps({{'strategies': strategies, 'v_head_stage': stage(net.v_head), 'loss_stage': stage(net.loss),
                  'primitives': sorted(n for n in dir(net.loss) if isinstance(getattr(net.loss, n, None),
                                                                              ms.ops.Primitive))}}))
"""


def layout(**parallel):
    proc = subprocess.run([sys.executable, "-c", LAYOUT, json.dumps(parallel)], env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dp2_mp4_strategies_of_the_7b_yaml():
    got = layout()  # the YAML's own parallel_config: dp 2, mp 4, pp 1
    s = got["strategies"]
    # every primitive CompareLoss holds has a strategy
    assert set(got["primitives"]) == {k.split(".", 1)[1] for k in s if k.startswith("loss.")}
    assert s["v_head.matmul"] == [[2, 1], [1, 1]]  # hidden whole at the head's input; weight replicated
    # chosen rows are the first half of the global batch: the slices may not cut the dp-split dimension
    assert s["loss.slice_chosen"] == s["loss.slice_rejected"] == [[1, 1]]
    assert s["loss.sub"] == s["loss.mul"] == s["loss.add"] == [[2, 1], [2, 1]]
    for name in ("cast", "cast_mask", "abs", "neg", "exp", "log1p", "relu", "sum_loss", "sum_mask"):
        assert s[f"loss.{name}"] == [[2, 1]], name
    assert s["loss.at_least_one"] == [[2], []] and s["loss.div"] == [[2], [2]] and s["loss.mean"] == [[2]]
    # per-pair margin (B,) -> (B, 1), added to the (B, S) or (B, 1) differences, split by dp
    assert s["loss.cast_margin"] == s["loss.expand_margin"] == [[2]]
    assert s["loss.add_margin"] == s["loss.add_score_margin"] == [[2, 1], [2, 1]]
    # last-token loss and centering on the (2B, 1) scores: halves gathered whole like the rewards, then dp
    assert s["loss.slice_chosen_score"] == s["loss.slice_rejected_score"] == [[1, 1]]
    assert s["loss.sub_score"] == s["loss.add_score"] == s["loss.add_center"] == [[2, 1], [2, 1]]
    for name in ("cast_score", "abs_score", "neg_score", "exp_score", "log1p_score", "relu_score", "mean_score",
                 "square_center", "mean_center"):
        assert s[f"loss.{name}"] == [[2, 1]], name
    assert s["loss.scale_center"] == s["loss.add_terms"] == [[], []]  # scalars
    # scoring: the gather reads the last real token of each row, rows split by dp, sequence whole
    assert s["model.gather"] == [[2, 1], [2, 1]]
    assert s["model.last_index"] == s["model.clip_low"] == s["model.clip_high"] == [[2, 1], []]
    assert got["v_head_stage"] is None and got["loss_stage"] is None  # one stage: nothing to place


def test_pipeline_places_head_and_loss_on_the_last_stage():
    got = layout(pipeline_stage=2, model_parallel=2, micro_batch_num=2)
    assert got["v_head_stage"] == 1 and got["loss_stage"] == 1
    assert got["strategies"]["v_head.matmul"] == [[2, 1], [1, 1]]


@pytest.mark.parametrize("key", ["compute_dtype", "param_init_type"])
def test_7b_yaml_keeps_float32_master_weights_with_float16_compute(key):
    from mindrlhf.training.config import load_config

    mc = load_config(str(CONFIG_7B)).model.model_config
    assert mc[key] == {"compute_dtype": "float16", "param_init_type": "float32"}[key]
