"""The training options peers have, each shown to act: per-pair margins (a MindRecord column, fed through the
dataset and the Trainer to the loss), reward centering, the last-token Bradley-Terry loss, and the over-long policy
of conversion. Every check compares with the formula (TRL's RewardTrainer: -log sigmoid(r_c - r_r - m) and
+ c * mean((r_c + r_r)^2)) or with counts computed independently, so ignoring an option fails it."""
import json

import numpy as np
import pytest
import sentencepiece as spm
from mindspore.mindrecord import FileReader

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.data.convert import SKIP_OVERLONG, convert_file
from mindrlhf.data.dataset import create_reward_dataset
from mindrlhf.data.records import RECORD_COLUMNS
from mindrlhf.data.tokenizer import load_tokenizer
from mindrlhf.errors import ConfigError, InputError
from mindrlhf.tools.loss_log import parse_log

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli
from families import build_reward_model

TEMPLATE = "根据以下问题，写一个合适的回答。\n\n### 问题：\n{instruction}\n\n### 回答：\n{response}"
MARGINS = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def softplus(x):
    return np.logaddexp(0.0, x)


def reference_loss(rewards, loss_mask, end_ind, margin=None, loss_type="span", center=0.0):
    """TRL's formulas (and the tutorial's span loss) in float64 numpy. rewards (2B, S), end_ind (2B,)."""
    rewards = np.asarray(rewards, np.float64)
    b = rewards.shape[0] // 2
    m = np.zeros(b) if margin is None else np.asarray(margin, np.float64)
    scores = rewards[np.arange(2 * b), np.asarray(end_ind) - 1]
    if loss_type == "span":
        per = softplus(rewards[b:] - rewards[:b] + m[:, None]) * loss_mask
        loss = np.mean(per.sum(-1) / np.maximum(loss_mask.sum(-1), 1))
    else:
        loss = np.mean(-np.log(1 / (1 + np.exp(-(scores[:b] - scores[b:] - m)))))  # -log sigmoid(r_c - r_r - m)
    return loss + center * np.mean((scores[:b] + scores[b:]) ** 2)


@pytest.mark.parametrize("loss_type", ["span", "last_token"])
@pytest.mark.parametrize("center", [0.0, 0.5])
@pytest.mark.parametrize("with_margin", [False, True])
def test_compare_loss_is_trls_formula(loss_type, center, with_margin):
    import mindspore as ms
    from mindformers import LlamaConfig

    from mindrlhf.model.loss import CompareLoss

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(8, 12)).astype(np.float32)
    mask = (rng.random((4, 12)) > 0.3).astype(np.float32)
    end_ind = rng.integers(1, 13, size=8)
    scores = rewards[np.arange(8), end_ind - 1].reshape(-1, 1)
    margin = np.array([0.5, -1.0, 2.0, 0.0], np.float32) if with_margin else None
    loss = CompareLoss(LlamaConfig(loss_type=loss_type, center_rewards_coefficient=center))
    assert loss.needs_scores == (loss_type == "last_token" or center > 0)
    got = float(loss(ms.Tensor(rewards), ms.Tensor(mask), ms.Tensor(scores) if loss.needs_scores else None,
                     None if margin is None else ms.Tensor(margin)).asnumpy())
    assert got == pytest.approx(reference_loss(rewards, mask, end_ind, margin, loss_type, center), rel=1e-5)
    if with_margin:  # the margin moves the loss
        assert abs(got - reference_loss(rewards, mask, end_ind, None, loss_type, center)) > 1e-2
    if center:
        assert abs(got - reference_loss(rewards, mask, end_ind, margin, loss_type, 0.0)) > 1e-2


def test_loss_options_are_checked_before_any_compute():
    from mindrlhf.training.trainer import prepare_config

    with pytest.raises(ConfigError, match=r"loss_type must be one of \('span', 'last_token'\), got 'hinge'"):
        prepare_config(str(TINY_CONFIG), loss_type="hinge")
    with pytest.raises(ConfigError, match="center_rewards_coefficient must be finite and >= 0, got -1.0"):
        prepare_config(str(TINY_CONFIG), center_rewards_coefficient=-1)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows(count=8, margins=None):
    rows = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()[:count]]
    if margins is not None:
        for row, margin in zip(rows, margins):
            row["margin"] = margin
    return rows




def schema_of(path):
    reader = FileReader(str(path), num_consumer=1)
    try:
        return reader.schema(), list(reader.get_next())
    finally:
        reader.close()


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_margins_become_a_column_and_a_model_input(tmp_path, layout, test_mindrecord):
    src = write_rows(tmp_path / "margins.jsonl", pair_rows(8, MARGINS))
    dst = tmp_path / "margins.mindrecord"
    result = convert_file(str(src), load_tokenizer(str(TOKENIZER)), str(dst), 256, progress=False, layout=layout)
    assert result["margin"] is True
    schema, rows = schema_of(dst)
    assert schema["margin"]["type"] == "float32"
    assert [float(r["margin"]) for r in rows] == MARGINS
    batch = next(create_reward_dataset(str(dst), 8, shuffle=False).create_dict_iterator(output_numpy=True))
    assert list(batch) == ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind", "margin"]
    np.testing.assert_array_equal(batch["margin"], np.array(MARGINS, np.float32))
    for i, row in enumerate(rows):  # margins stay with their pairs
        real = row["chosen_input_ids"][:int(row["chosen_attention_mask"].sum())]
        np.testing.assert_array_equal(batch["input_ids"][i][:len(real)], real)
    # without margins the file keeps the tutorial's 7 fields and the model its 5 inputs
    schema, _ = schema_of(test_mindrecord)
    assert set(schema) == set(RECORD_COLUMNS)
    plain = next(create_reward_dataset(str(test_mindrecord), 2).create_dict_iterator(output_numpy=True))
    assert list(plain) == ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"]


def test_margins_on_some_rows_only_are_refused(tmp_path):
    rows = pair_rows(4, [1.0, 2.0, None, 1.0])
    del rows[2]["margin"]
    src = write_rows(tmp_path / "some.jsonl", rows)
    tokenizer = load_tokenizer(str(TOKENIZER))
    with pytest.raises(InputError, match=rf"{src}:3: field 'margin': missing: the first row has a margin"):
        convert_file(str(src), tokenizer, str(tmp_path / "x.mindrecord"), 256, progress=False)
    result = convert_file(str(src), tokenizer, str(tmp_path / "y.mindrecord"), 256, progress=False,
                          skip_invalid=True)
    assert result["rows"] == 3 and result["skipped"]["by_reason"] == {
        "field 'margin' missing: the first row has a margin; give every row a margin or none":
            {"count": 1, "first_lines": [3]}}
    bad = write_rows(tmp_path / "bad.jsonl", pair_rows(2, [1.0, "big"]))
    with pytest.raises(InputError, match=rf"{bad}:2: field 'margin': must be a finite number, got 'big'"):
        convert_file(str(bad), tokenizer, str(tmp_path / "z.mindrecord"), 256, progress=False)


@pytest.fixture(scope="module")
def overlong_source(tmp_path_factory):
    """10 test pairs, two of them made longer than 256 tokens (some are already); which pairs are over-long is
    counted here with SentencePiece itself."""
    rows = pair_rows(10)
    for i in (3, 7):
        rows[i]["pos_resp"] = rows[i]["pos_resp"] * 6
    src = write_rows(tmp_path_factory.mktemp("overlong") / "pairs.jsonl", rows)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    lengths = [max(len(sp.encode(TEMPLATE.format(instruction=r["prompt"].strip(), response=r[k].strip())))
                   for k in ("pos_resp", "neg_resp")) for r in rows]
    over = [i + 1 for i, n in enumerate(lengths) if n > 256]  # 1-based lines
    assert {4, 8} <= set(over) and len(over) < 10, lengths
    return src, over


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_policies_count_what_they_do(tmp_path, overlong_source, policy):
    src, over = overlong_source
    dst = tmp_path / f"{policy}.mindrecord"
    result = convert_file(str(src), load_tokenizer(str(TOKENIZER)), str(dst), 256, progress=False, overlong=policy)
    stats = result["stats"]
    assert stats["overlong_policy"] == policy and stats["overlong_pairs"] == len(over)
    _, rows = schema_of(dst)
    if policy == "truncate":  # the tutorial's way: kept, cut at 256
        assert len(rows) == 10 and stats["truncated_pairs"] == len(over)
        assert all(max(rows[line - 1]["chosen_attention_mask"].sum(), rows[line - 1]["rejected_attention_mask"].sum())
                   == 256 for line in over)
    else:  # TRL's max_length filter: left out, reported by line
        assert len(rows) == 10 - len(over) and stats["truncated_pairs"] == 0
        assert result["skipped"]["by_reason"] == {SKIP_OVERLONG: {"count": len(over), "first_lines": over}}
    saved = json.loads(dst.with_name(dst.name + ".stats.json").read_text(encoding="utf-8"))
    assert saved["stats"]["overlong_pairs"] == len(over) and saved["stats"]["overlong_policy"] == policy


def test_overlong_error_names_file_line_and_field(tmp_path, overlong_source):
    src, over = overlong_source
    dst = tmp_path / "error.mindrecord"
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src, "--dst_file", dst,
                   "--seq_length", 256, "--overlong", "error", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert f"{src}:{over[0]}: field 'pos_resp':" in err and "longer than --seq_length 256 (--overlong error" in err
    assert not dst.exists() and not list(tmp_path.glob(".partial-*"))


@pytest.fixture(scope="module")
def known_start(tmp_path_factory):
    """8 test pairs with margins in one MindRecord (one step of 8 pairs), and a whole reward-model checkpoint
    (value head included) so the first step's loss can be computed here from the same weights."""
    import mindspore as ms

    work = tmp_path_factory.mktemp("options")
    src = write_rows(work / "pairs.jsonl", pair_rows(8, MARGINS))
    data = work / "pairs.mindrecord"
    convert_file(str(src), load_tokenizer(str(TOKENIZER)), str(data), 256, progress=False)
    ms.set_seed(7)
    model = build_reward_model(TINY_CONFIG)
    ckpt = work / "start.ckpt"
    ms.save_checkpoint(model, str(ckpt))
    model = build_reward_model(TINY_CONFIG, ckpt)
    batch = next(create_reward_dataset(str(data), 8, shuffle=False).create_dict_iterator(output_numpy=True))
    rewards = model.token_rewards(ms.Tensor(batch["input_ids"])).asnumpy()
    return {"work": work, "data": data, "ckpt": ckpt, "rewards": rewards, "batch": batch}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["span", "last_token"])
def test_the_trainer_applies_margin_centering_and_loss_type(known_start, loss_type):
    """One real Trainer step from known weights: the logged loss is the formula with this run's margins and
    centering, and differs from it without either."""
    out = known_start["work"] / f"run_{loss_type}"
    proc = run_cli(EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset", known_start["data"],
                   "--output_dir", out, "--load_checkpoint", known_start["ckpt"], "--batch_size", 8,
                   "--loss_type", loss_type, "--center_rewards_coefficient", 0.5)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["margin"] is True and summary["loss_type"] == loss_type, proc.stdout[-2000:]
    logged = parse_log(out / "log" / "rank_0" / "info.log")[0].loss
    batch, rewards = known_start["batch"], known_start["rewards"]
    args = (rewards, batch["loss_mask"], batch["end_ind"])
    expected = reference_loss(*args, MARGINS, loss_type, 0.5)
    assert logged == pytest.approx(expected, rel=2e-5, abs=2e-6)
    for ignored in (reference_loss(*args, None, loss_type, 0.5), reference_loss(*args, MARGINS, loss_type, 0.0),
                    reference_loss(*args, MARGINS, "last_token" if loss_type == "span" else "span", 0.5)):
        assert abs(logged - ignored) > 1e-3, (logged, ignored)
