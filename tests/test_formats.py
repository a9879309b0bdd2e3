"""Preference layouts (mindrlhf.data.formats): each converts from a few rows written in it, in each file kind, to
the ids the chat template renders for the whole conversation; the converted layouts train together in one short
run; a row fitting no layout is refused naming file, line and field; the reward of a multi-turn conversation is read
at the last token of its final assistant turn where EOS ends every turn and pad equals EOS."""
import json
import shutil

import numpy as np
import pytest
from mindspore.mindrecord import FileReader

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.data.convert import convert_file
from mindrlhf.data.formats import detect_format, read_preference_pairs, shared_prefix_prompt
from mindrlhf.data.templates import resolve_template
from mindrlhf.data.tokenizer import load_tokenizer
from mindrlhf.errors import ConfigError, InputError

from conftest import EXAMPLES, run_cli, run_main
from families import FAMILIES, train_tokenizer

Q1, Q2 = "怎么学习编程？", "那数学呢？"
SYSTEM = "回答问题。"  # short: Qwen's default system prompt is long in the tiny tokenizers' ids
A1 = "多写代码。"
GOOD, BAD = "每天练习，做题，看书。", "不用学。"


def msg(role, content):
    return {"role": role, "content": content}


def layout_rows():
    """Two rows per layout (one multi-turn where the layout has turns), and what each pair's chosen conversation is."""
    conv_prompt = [msg("system", SYSTEM), msg("user", Q1), msg("assistant", A1), msg("user", Q2)]
    return {
        "standard": [{"prompt": Q1, "chosen": GOOD, "rejected": BAD},
                     {"prompt": Q2, "chosen": "先学基础。", "rejected": BAD}],
        "implicit": [{"chosen": "\n\nHuman: 学编程？\n\nAssistant: 多练。", "rejected": f"\n\nHuman: 学编程？\n\nAssistant: {BAD}"},
                     {"chosen": f"\n\nHuman: {Q2}\n\nAssistant: 先学基础。", "rejected": f"\n\nHuman: {Q2}\n\nAssistant: {BAD}"}],
        "conversational": [{"prompt": conv_prompt, "chosen": [msg("assistant", GOOD)],
                            "rejected": [msg("assistant", BAD)]},
                           {"chosen": conv_prompt + [msg("assistant", "先学基础。")],  # whole conversations
                            "rejected": conv_prompt + [msg("assistant", BAD)]}],
        "bestofn": [{"prompt": Q1, "chosen": [GOOD], "rejected": [BAD, "随便。"], "subset": "Focus", "id": "0"}],
    }


def write_rows(path, rows):
    kind = path.suffix or "folder"
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "qwen2", "qwen2")


def records(path):
    reader = FileReader(str(path), num_consumer=1)
    rows = list(reader.get_next())
    reader.close()
    return rows


@pytest.fixture(scope="module")
def converted(qwen, tmp_path_factory):
    """Every layout, each in another file kind, converted with the chat template into one folder."""
    work = tmp_path_factory.mktemp("layouts")
    kinds = {"standard": ".jsonl", "implicit": ".json", "conversational": ".parquet", "bestofn": ""}
    tokenizer = load_tokenizer(str(qwen))
    template = resolve_template("chat", tokenizer)
    out = {}
    for fmt, rows in layout_rows().items():
        src = write_rows(work / f"{fmt}{kinds[fmt]}", rows)
        dst = work / "data" / f"{fmt}.mindrecord"
        result = convert_file(str(src), tokenizer, str(dst), 128, progress=False, template=template)
        out[fmt] = {"src": src, "dst": dst, "result": result}
    return {"work": work, "layouts": out, "tokenizer": tokenizer, "template": template}


def test_layouts_are_read_by_their_columns(converted):
    for fmt, item in converted["layouts"].items():
        assert item["result"]["format"] == fmt
    counts = {fmt: item["result"]["rows"] for fmt, item in converted["layouts"].items()}
    assert counts == {"standard": 2, "implicit": 2, "conversational": 2, "bestofn": 2}  # bestofn: 1 chosen x 2


def test_each_layout_renders_the_whole_conversation(converted):
    """Decoded chosen rows equal the chat template over the conversation, every turn, as transformers renders it."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(converted["tokenizer"].folder))
    conv = [msg("system", SYSTEM), msg("user", Q1), msg("assistant", A1), msg("user", Q2)]
    expected = {
        "standard": [[msg("user", Q1), msg("assistant", GOOD)], [msg("user", Q2), msg("assistant", "先学基础。")]],
        "implicit": [[msg("user", "Human: 学编程？\n\nAssistant:"), msg("assistant", "多练。")],
                     [msg("user", f"Human: {Q2}\n\nAssistant:"), msg("assistant", "先学基础。")]],
        "conversational": [conv + [msg("assistant", GOOD)], conv + [msg("assistant", "先学基础。")]],
        "bestofn": [[msg("user", Q1), msg("assistant", GOOD)]] * 2,
    }
    for fmt, item in converted["layouts"].items():
        rows = records(item["dst"])
        for row, messages in zip(rows, expected[fmt]):
            n = int(row["chosen_attention_mask"].sum())
            want = hf.apply_chat_template(messages, tokenize=True)
            assert row["chosen_input_ids"][:n].tolist() == list(want)[:128], fmt  # truncated at seq_length


def test_ultrafeedback_binarized_rows_prompt_text_and_whole_conversations(tmp_path):
    """UltraFeedback-binarized keeps the prompt's text beside whole conversations; a text prompt with only the final
    turns becomes the user turn."""
    whole = {"prompt": Q1, "chosen": [msg("user", Q1), msg("assistant", GOOD)],
             "rejected": [msg("user", Q1), msg("assistant", BAD)], "score_chosen": 8.0, "score_rejected": 2.0}
    turns = {"prompt": Q1, "chosen": [msg("assistant", GOOD)], "rejected": [msg("assistant", BAD)]}
    src = write_rows(tmp_path / "uf.jsonl", [whole, turns])
    first, second = read_preference_pairs(str(src))
    assert first.chosen_messages == second.chosen_messages == [msg("user", Q1), msg("assistant", GOOD)]
    assert first.rejected_messages == second.rejected_messages == [msg("user", Q1), msg("assistant", BAD)]


def test_implicit_prompt_is_the_shared_prefix():
    assert shared_prefix_prompt("\n\nHuman: hi\n\nAssistant: Also yes", "\n\nHuman: hi\n\nAssistant: Also no") == \
        "\n\nHuman: hi\n\nAssistant:"  # cut at the marker: the shared 'Also' stays in both responses
    assert shared_prefix_prompt("Q: 2+2? A: four", "Q: 2+2? A: five") == "Q: 2+2? A: "


def test_margin_column_is_kept(qwen, tmp_path):
    src = write_rows(tmp_path / "m.jsonl", [{"prompt": Q1, "chosen": GOOD, "rejected": BAD, "margin": 1.5}])
    tokenizer = load_tokenizer(str(qwen))
    result = convert_file(str(src), tokenizer, str(tmp_path / "m.mindrecord"), 64, progress=False)
    assert result["margin"] is True and records(tmp_path / "m.mindrecord")[0]["margin"] == pytest.approx(1.5)


@pytest.mark.parametrize("rows, line, field", [
    ([{"prompt": Q1, "chosen": GOOD, "rejected": BAD}, {"prompt": Q1, "chosen": GOOD}], 2, "rejected"),
    ([{"question": Q1, "answer": GOOD}], 1, "chosen"),
    ([{"prompt": Q1, "chosen": 3, "rejected": BAD}], 1, "chosen"),
    ([{"prompt": [msg("user", Q1)], "chosen": [msg("assistant", GOOD)], "rejected": [{"role": "bot", "content": "x"}]}],
     1, "rejected[0]"),
    ([{"chosen": [msg("user", Q1), msg("assistant", GOOD)], "rejected": [msg("user", Q2), msg("assistant", BAD)]}],
     1, "rejected[0]"),
    ([{"prompt": [msg("user", Q1)], "chosen": [msg("user", GOOD)], "rejected": [msg("assistant", BAD)]}],
     1, "chosen"),
    ([{"prompt": Q1, "chosen": [GOOD], "rejected": [BAD]}], 1, "subset"),
    ([{"prompt": Q1, "chosen": GOOD, "rejected": BAD, "margin": "big"}], 1, "margin"),
])
def test_a_row_fitting_no_layout_names_file_line_and_field(tmp_path, rows, line, field):
    src = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as err:
        list(read_preference_pairs(str(src)))
    assert (err.value.path, err.value.line, err.value.field) == (str(src), line, field), str(err.value)
    assert str(err.value).startswith(f"{src}:{line}: field '{field}'")


def test_parquet_rows_are_numbered_and_format_is_checked(tmp_path):
    src = write_rows(tmp_path / "bad.parquet", [{"prompt": Q1, "chosen": GOOD, "rejected": BAD},
                                                {"prompt": Q1, "chosen": GOOD, "rejected": ""}])
    with pytest.raises(InputError, match=r"bad.parquet:2: field 'rejected': is empty"):
        list(read_preference_pairs(str(src)))
    with pytest.raises(InputError, match=r":1: field 'chosen'"):  # --format conversational on string rows
        list(read_preference_pairs(str(src), "conversational"))
    assert detect_format({"prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "x"}, "f", 1) == "bestofn"


def test_conversations_need_a_chat_template(qwen, tmp_path):
    src = write_rows(tmp_path / "c.jsonl", layout_rows()["conversational"])
    with pytest.raises(ConfigError, match="conversational rows need a chat template"):
        convert_file(str(src), load_tokenizer(str(qwen)), str(tmp_path / "c.mindrecord"), 64, progress=False)
    assert not (tmp_path / "c.mindrecord").exists()


def test_multi_turn_reward_index_where_pad_is_eos(qwen, tmp_path):
    """EOS (<|im_end|>) ends every turn and is the pad token: conversion refuses to pad with it (the model masks
    the pad id as padding, hiding the earlier turn ends); with another pad, the row's end is the final assistant
    turn's last token, past every earlier EOS (the first-pad rule of transformers#35352 would stop at the first);
    and the scorer reads exactly there when the padding is EOS."""
    folder = tmp_path / "tok"
    shutil.copytree(qwen, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    tokenizer = load_tokenizer(str(folder))
    eos = tokenizer.eos_id
    assert tokenizer.default_pad_id == eos
    template = resolve_template("chat", tokenizer)
    src = write_rows(tmp_path / "conv.jsonl", layout_rows()["conversational"][:1])
    with pytest.raises(InputError, match=rf"conv.jsonl:1: field 'chosen': the text holds token id {eos}, the pad id"):
        convert_file(str(src), tokenizer, str(tmp_path / "x.mindrecord"), 128, progress=False, template=template)
    pad = tokenizer.token_id("unk_token") or 0  # <|endoftext|>
    convert_file(str(src), tokenizer, str(tmp_path / "ok.mindrecord"), 128, pad_token_id=pad, progress=False,
                 template=template)
    row = records(tmp_path / "ok.mindrecord")[0]
    ids = row["chosen_input_ids"].tolist()
    n = int(row["chosen_attention_mask"].sum())
    text = template.render_messages([msg("system", SYSTEM), msg("user", Q1), msg("assistant", A1), msg("user", Q2), msg("assistant", GOOD)])
    assert ids[:n] == tokenizer.encode([text], special_tokens=False)[0]
    eos_positions = [i for i in range(n) if ids[i] == eos]
    assert len(eos_positions) == 5  # system, user, assistant, user, assistant: EOS ends every turn
    final_turn_end = eos_positions[-1] + 1  # '<|im_end|>' then the template's '\n': the rendered turn's last token
    assert n - 1 == final_turn_end and tokenizer.decode(ids[eos_positions[-1]:n]) == "<|im_end|>\n"
    assert eos_positions[0] - 1 != n - 1  # where a first-pad rule would read
    assert int(row["end_ind"]) == max(n, int(row["rejected_attention_mask"].sum()))


def test_scorer_reads_past_earlier_eos_when_pad_is_eos():
    """The model's reward index is each sequence's own length - 1, never the first pad: with pad == EOS == 2 and
    EOS inside the sequence, the reward equals the per-token reward at the last real token."""
    import mindspore as ms
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    from conftest import TINY_CONFIG

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    eos = pad = int(cfg["pad_token_id"])
    net = LlamaRewardModel(LlamaConfig(**cfg))
    net.set_train(False)
    turns = [[10, 11, 12, eos], [20, 21, eos], [30, 31, 32, 33, eos]]  # every turn ends in EOS
    seq = [t for turn in turns for t in turn]
    ids = np.full((1, 32), pad, np.int32)
    ids[0, :len(seq)] = seq
    reward = net(ms.Tensor(ids), None, None, None, ms.Tensor(np.array([len(seq)], np.int32))).asnumpy()[0]
    per_token = net.token_rewards(ms.Tensor(ids)).asnumpy()[0]
    assert reward == pytest.approx(per_token[len(seq) - 1], abs=1e-6)
    first_eos = seq.index(eos)
    assert reward != pytest.approx(per_token[first_eos - 1], abs=1e-4)




@pytest.fixture(scope="module")
def trained(converted):
    """One short run over every layout's MindRecord (a folder of them), with the Qwen2 tiny config."""
    work = converted["work"]
    out = work / "output"
    run_cli(EXAMPLES / "reward_train.py", "--config", FAMILIES["qwen2"]["config"], "--train_dataset", work / "data",
            "--output_dir", out, "--batch_size", 2, "--stop_step", 2, "--epochs", 1, cwd=work)
    return {**converted, "output": out, "summary": json.loads((out / "train_summary.json").read_text())}


def test_the_layouts_train_together(trained):
    summary = trained["summary"]
    assert summary["pairs"] == 8 and summary["template"] == "chat"
    assert np.isfinite(summary["last_loss"])


def test_rewardbench_benchmarks_and_layouts_evaluate_and_infer(trained, tmp_path):
    """reward_eval --benchmark on v1 rows (jsonl) and v2 rows (a datasets folder): the per-checkpoint scores are the
    benchmark's rules over the pair rewards it wrote; a conversational Parquet file is scored by reward_infer."""
    from mindrlhf.evaluation.rewardbench import benchmark_scores

    config, ckpt, tok = FAMILIES["qwen2"]["config"], trained["output"] / "checkpoint", trained["tokenizer"].folder
    v1 = write_rows(tmp_path / "rb1.jsonl", [
        {"prompt": Q1, "chosen": GOOD, "rejected": BAD, "subset": "alpacaeval-easy", "id": 0},
        {"prompt": Q2, "chosen": "先学基础。", "rejected": BAD, "subset": "math-prm", "id": 1},
        {"prompt": Q2, "chosen": "先学基础。", "rejected": "随便。", "subset": "hep-go", "id": 2}])
    v2 = write_rows(tmp_path / "rb2", [
        {"prompt": Q1, "chosen": [GOOD], "rejected": [BAD, "随便。", "不知道。"], "subset": "Focus", "id": "7"},
        {"prompt": Q2, "chosen": ["先学基础。", "多做题。"], "rejected": [BAD], "subset": "Ties", "id": "tied:1"},
        {"prompt": Q2, "chosen": ["先学基础。"], "rejected": [BAD], "subset": "Ties", "id": "ref:1"}])
    for name, src, pairs in (("rewardbench", v1, 3), ("rewardbench2", v2, 3 + 2 + 1)):
        out = tmp_path / f"{name}.json"
        proc = run_main(EXAMPLES / "reward_eval.py", "--config", config, "--distributed_ckpt_path", ckpt,
                        "--eval_dataset", src, "--tokenizer", tok, "--benchmark", name, "--output_file", out,
                        "--scores_file", tmp_path / f"{name}.scores.jsonl")
        result = json.loads(out.read_text())
        assert result["pairs"] == pairs and f"{name}:" in proc.stdout and "calibration: ECE" in proc.stdout
        scores = [json.loads(line) for line in (tmp_path / f"{name}.scores.jsonl").read_text().splitlines()]
        newest = result["checkpoints"][-1]
        info = {"name": name, "subsets": ["alpacaeval-easy", "math-prm", "hep-go"],
                "groups": [{"subset": "Focus", "id": "7", "start": 0, "chosen": 1, "rejected": 3},
                           {"subset": "Ties", "id": "tied:1", "start": 3, "chosen": 2, "rejected": 1},
                           {"subset": "Ties", "id": "ref:1", "start": 5, "chosen": 1, "rejected": 1}]}
        expected = benchmark_scores(info, [s["chosen_score"] for s in scores], [s["rejected_score"] for s in scores])
        assert newest[name] == json.loads(json.dumps(expected))  # the scores file's floats are the rewards
        assert (tmp_path / f"{name}_report" / "report.md").is_file()
    infer_out = tmp_path / "conv_scores.jsonl"
    run_main(EXAMPLES / "reward_infer.py", "--config", config, "--data_file", trained["layouts"]["conversational"]["src"],
             "--tokenizer", tok, "--distributed_ckpt_path", ckpt, "--output_file", infer_out)
    scored = [json.loads(line) for line in infer_out.read_text(encoding="utf-8").splitlines()]
    assert [s["kind"] for s in scored] == ["chosen", "rejected"] * 2 and all(np.isfinite(s["score"]) for s in scored)


def test_a_datasets_dict_folder_reads_its_splits_in_turn(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = layout_rows()["standard"]
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows[1:])}).save_to_disk(
        str(tmp_path / "dd"))
    pairs = list(read_preference_pairs(str(tmp_path / "dd")))
    assert [(p.line, p.prompt) for p in pairs] == [(1, Q1), (2, Q2)]
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="save_to_disk"):
        list(read_preference_pairs(str(tmp_path / "plain")))
