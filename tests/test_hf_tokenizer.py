"""Hugging Face tokenizer folders and templates: a tokenizer.json trained here on the train split converts the shared
data with ids equal to the `tokenizers` library's own, row by row; chat templates render as transformers'
apply_chat_template (transformers is the reference; it needs no PyTorch for tokenizers); the run's template is
recorded in the sidecar; bad templates, tokenizers and pad ids are refused with a clear message."""
import json
import shutil

import numpy as np
import pytest
from mindspore.mindrecord import FileReader
from tokenizers import Tokenizer

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.data.convert import convert_file
from mindrlhf.data.templates import resolve_template
from mindrlhf.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from mindrlhf.errors import ConfigError, InputError

from conftest import EXAMPLES, TEST_JSONL, TOKENIZER, run_cli
from families import train_tokenizer

TEMPLATE = "根据以下问题，写一个合适的回答。\n\n### 问题：\n{instruction}\n\n### 回答：\n{response}"
PROMPT, RESPONSE = "怎么学习编程？", "多写代码。"
EXPECTED_CHAT = {
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n怎么学习编程？<|im_end|>\n<|im_start|>assistant\n多写代码。<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n怎么学习编程？<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n多写代码。<|eot_id|>",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf_tokenizers")
    return {style: train_tokenizer(work / style, style) for style in ("qwen2", "llama3")}


def messages(prompt=PROMPT, response=RESPONSE):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def rows_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def records(path):
    reader = FileReader(str(path), num_consumer=1)
    rows = list(reader.get_next())
    reader.close()
    return rows


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_chat_template_renders_as_apply_chat_template(folders, style):
    from transformers import AutoTokenizer

    template = resolve_template("chat", load_tokenizer(str(folders[style])))
    ours = template.render("  " + PROMPT + "\n", RESPONSE)  # inputs are stripped, as the tutorial's template does
    assert ours == EXPECTED_CHAT[style]
    reference = AutoTokenizer.from_pretrained(str(folders[style]))
    assert reference.apply_chat_template(messages(), tokenize=False) == ours
    assert template.encode(load_tokenizer(str(folders[style])), [PROMPT], [RESPONSE])[0] == \
        list(reference.apply_chat_template(messages(), tokenize=True))


def test_jinja_features_render_as_transformers(folders, tmp_path):
    """A template file using what real chat templates use: whitespace control with trim/lstrip_blocks, namespace,
    transformers' tojson (non-ASCII kept), {% generation %}, special-token variables, raise_exception."""
    from transformers import AutoTokenizer

    source = ("{%- set ns = namespace(n=0) %}\n"
              "{%- for m in messages %}\n"
              "    {%- set ns.n = ns.n + 1 %}\n"
              "    {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
              "{{ m.role | upper }}{{ ns.n }}: {{ m.content | tojson }}\n"
              "    {% if m.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}\n"
              "{% endfor %}")
    path = tmp_path / "custom.jinja"
    path.write_text(source, encoding="utf-8")
    ours = resolve_template(str(path), load_tokenizer(str(folders["qwen2"]))).render(PROMPT, RESPONSE)
    reference = AutoTokenizer.from_pretrained(str(folders["qwen2"]))
    assert ours == reference.apply_chat_template(messages(), chat_template=source, tokenize=False)
    assert '"怎么学习编程？"' in ours and "<|im_end|>" in ours


def reference_rows(ids_chosen, ids_rejected, seq, pad):
    """The tutorial's record semantics, written out from given token ids."""
    out = []
    for c, r in zip(ids_chosen, ids_rejected):
        c, r = c[:seq], r[:seq]
        c_pad, r_pad = np.array(c + [pad] * (seq - len(c))), np.array(r + [pad] * (seq - len(r)))
        diff = np.nonzero(c_pad != r_pad)[0]
        end = max(len(c), len(r))
        loss_mask = np.zeros(seq, dtype=np.int64)
        loss_mask[diff[0]:end] = 1
        out.append({"chosen_input_ids": c_pad, "rejected_input_ids": r_pad, "loss_mask": loss_mask, "end_ind": end,
                    "chosen_attention_mask": (np.arange(seq) < len(c)).astype(int),
                    "rejected_attention_mask": (np.arange(seq) < len(r)).astype(int)})
    return out


def assert_records_equal(path, expected):
    got = records(path)
    assert len(got) == len(expected) == 773
    for i, (want, have) in enumerate(zip(expected, got)):
        for name, value in want.items():
            np.testing.assert_array_equal(np.asarray(have[name]), value, err_msg=f"row {i}: {name}")


def test_chat_conversion_ids_equal_tokenizers_row_by_row(folders, tmp_path):
    """Qwen2.5-style folder, --template chat, pad id from the tokenizer (<|endoftext|>): every row equals the
    `tokenizers` library's ids of the text transformers renders."""
    from transformers import AutoTokenizer

    dst = tmp_path / "test_chat.mindrecord"
    run_cli(EXAMPLES / "cvalues_comparison.py", "--model", folders["qwen2"], "--template", "chat",
            "--src_file", TEST_JSONL, "--dst_file", dst, "--seq_length", 128)
    tk, hf = Tokenizer.from_file(str(folders["qwen2"] / "tokenizer.json")), AutoTokenizer.from_pretrained(
        str(folders["qwen2"]))
    rows = rows_of(TEST_JSONL)

    def encode(key):
        texts = [hf.apply_chat_template(messages(r["prompt"].strip(), r[key].strip()), tokenize=False) for r in rows]
        return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]

    pad = tk.token_to_id("<|endoftext|>")
    assert_records_equal(dst, reference_rows(encode("pos_resp"), encode("neg_resp"), 128, pad))
    meta = json.loads(dst.with_name(dst.name + ".stats.json").read_text(encoding="utf-8"))
    assert meta["pad_token_id"] == pad == 0 and meta["tokenizer"] == str(folders["qwen2"] / "tokenizer.json")
    template = meta["template"]
    assert template["name"] == "chat" and template["kind"] == "jinja"
    assert template["source"] == json.loads((folders["qwen2"] / "tokenizer_config.json").read_text())["chat_template"]
    assert template["variables"] == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_tutorial_template_with_a_llama3_tokenizer_adds_its_bos(folders, tmp_path):
    """Plain text gets the tokenizer's own special tokens, as transformers' tokenizer(text) does: Llama 3's
    post-processor puts <|begin_of_text|> first."""
    tokenizer = load_tokenizer(str(folders["llama3"]))
    dst = tmp_path / "test_tutorial.mindrecord"
    convert_file(str(TEST_JSONL), tokenizer, str(dst), 128, progress=False)
    tk = Tokenizer.from_file(str(folders["llama3"] / "tokenizer.json"))
    rows = rows_of(TEST_JSONL)

    def encode(key):
        texts = [TEMPLATE.format(instruction=r["prompt"].strip(), response=r[key].strip()) for r in rows]
        return [e.ids for e in tk.encode_batch(texts)]  # add_special_tokens=True: the post-processor's BOS

    chosen = encode("pos_resp")
    assert all(ids[0] == tk.token_to_id("<|begin_of_text|>") for ids in chosen)
    assert_records_equal(dst, reference_rows(chosen, encode("neg_resp"), 128, tk.token_to_id(
        "<|finetune_right_pad_id|>")))
    meta = json.loads(dst.with_name(dst.name + ".stats.json").read_text(encoding="utf-8"))
    assert meta["template"]["name"] == "tutorial" and meta["template"]["source"] == TEMPLATE


def test_bos_eos_flags_of_tokenizer_config_as_transformers(folders, tmp_path):
    """add_bos_token/add_eos_token in tokenizer_config.json decide, as LlamaTokenizerFast does."""
    from transformers import AutoTokenizer

    folder = tmp_path / "flags"
    shutil.copytree(folders["llama3"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=True,
                  eos_token="<|end_of_text|>", legacy=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = TEMPLATE.format(instruction=PROMPT, response=RESPONSE)
    ours = load_tokenizer(str(folder)).encode([text])[0]
    reference = AutoTokenizer.from_pretrained(str(folder))
    assert ours == reference(text)["input_ids"]
    assert ours[0] == reference.bos_token_id and ours[-1] == reference.eos_token_id


def test_sentencepiece_runs_record_the_tutorial_template(test_mindrecord):
    meta = json.loads(test_mindrecord.with_name(test_mindrecord.name + ".stats.json").read_text(encoding="utf-8"))
    assert meta["template"]["name"] == "tutorial" and meta["template"]["source"] == TEMPLATE
    assert meta["pad_token_id"] == 2 and meta["margin"] is False


def test_template_file(tmp_path):
    path = tmp_path / "my_template.txt"
    path.write_text("Q: {instruction}\nA: {response}", encoding="utf-8")
    tokenizer = load_tokenizer(str(TOKENIZER))
    template = resolve_template(str(path), tokenizer)
    assert template.render(" 问 ", "答") == "Q: 问\nA: 答" and template.name == str(path)
    assert template.encode(tokenizer, ["问"], ["答"])[0] == tokenizer.encode(["Q: 问\nA: 答"])[0]
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: {question}\nA: {response}", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{bad}: a template file needs exactly the fields \{{instruction\}} "
                                          r"and \{response\}, found \['question', 'response'\]"):
        resolve_template(str(bad), tokenizer)
    with pytest.raises(ConfigError, match="is not one of tutorial, chat or an existing file"):
        resolve_template("chatml", tokenizer)


def test_tokenizer_folders_resolve_and_refuse(folders, tmp_path):
    assert isinstance(load_tokenizer(str(folders["qwen2"])), HFTokenizer)
    assert isinstance(load_tokenizer(str(folders["qwen2"] / "tokenizer.json")), HFTokenizer)
    both = tmp_path / "both"
    shutil.copytree(folders["qwen2"], both)
    shutil.copy(TOKENIZER, both / "tokenizer.model")
    assert isinstance(load_tokenizer(str(both)), SentencePieceTokenizer)  # a Llama 2 HF folder keeps the tutorial's
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    no_chat = tmp_path / "no_chat"
    shutil.copytree(folders["qwen2"], no_chat)
    config = json.loads((no_chat / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_chat / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_template("chat", load_tokenizer(str(no_chat)))
    (no_chat / "chat_template.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")  # transformers' file
    assert resolve_template("chat", load_tokenizer(str(no_chat))).render("p", "r") == "p"


def test_pad_id_inside_the_text_is_refused(folders, tmp_path):
    """Llama 3's eos <|eot_id|> ends every chat turn: as pad id the model would mask it away."""
    tokenizer = load_tokenizer(str(folders["llama3"]))
    with pytest.raises(InputError, match=rf"{TEST_JSONL}:1: field 'pos_resp': the text holds token id 4, the pad id"):
        convert_file(str(TEST_JSONL), tokenizer, str(tmp_path / "x.mindrecord"), 128, pad_token_id=4,
                     progress=False, template=resolve_template("chat", tokenizer))
    assert not list(tmp_path.iterdir())


def test_chat_templates_need_a_hugging_face_tokenizer(tmp_path):
    sentencepiece = load_tokenizer(str(TOKENIZER))
    with pytest.raises(ConfigError, match=rf"--template chat: the tokenizer {TOKENIZER} has no chat template"):
        resolve_template("chat", sentencepiece)
    path = tmp_path / "chat.jinja"
    path.write_text("{{ bos_token }}{{ messages[0].content }}", encoding="utf-8")
    with pytest.raises(ConfigError, match="SentencePiece cannot read special tokens written in the text"):
        resolve_template(str(path), sentencepiece)
