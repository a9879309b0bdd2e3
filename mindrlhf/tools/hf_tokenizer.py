"""Small Hugging Face tokenizer folders shaped like Qwen2.5's and Llama 3's, trained on a CValues jsonl.

For trying the Qwen2/Llama 3 configs on CPU and for the tests: byte-level BPE with the family's pre-tokenizer
regex, special tokens, BOS rule (Llama 3's post-processor adds <|begin_of_text|>, Qwen adds none), and chat
template (Qwen2.5's ChatML with its default system prompt, without the tools branch; Llama 3's header format),
written as tokenizer.json + tokenizer_config.json the way transformers saves them. Nothing is downloaded.

    python -m mindrlhf.tools.hf_tokenizer --style qwen2 --train_file train.jsonl --output_dir tok_qwen
"""
import argparse
import json
import os
from typing import Iterable, List

QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role != 'system' %}\n"
    "        {{- raise_exception('unsupported role: ' + message.role) }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# The families' pre-tokenizer regexes (Qwen2: single digits; Llama 3: up to three).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

STYLES = {
    "qwen2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "split": QWEN2_SPLIT,
              "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "unk_token": None, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
                         "add_prefix_space": False, "split_special_tokens": False},
              "chat_template": QWEN2_CHAT_TEMPLATE, "bos": None},
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|finetune_right_pad_id|>"], "split": LLAMA3_SPLIT,
               "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                          "pad_token": "<|finetune_right_pad_id|>", "tokenizer_class": "PreTrainedTokenizerFast",
                          "model_input_names": ["input_ids", "attention_mask"]},
               "chat_template": LLAMA3_CHAT_TEMPLATE, "bos": "<|begin_of_text|>"},
}


def corpus(jsonl: str) -> List[str]:
    texts = []
    with open(jsonl, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts += [row["prompt"], row["pos_resp"], row["neg_resp"]]
    return texts


def train_hf_tokenizer(texts: Iterable[str], output_dir: str, style: str = "qwen2", vocab_size: int = 2048) -> str:
    """Train and write <output_dir>/tokenizer.json and tokenizer_config.json; returns output_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = STYLES[style]
    tokenizer = Tokenizer(models.BPE())
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    if spec["bos"]:
        bos = spec["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for t in spec["specials"]}
    config = dict(spec["config"], added_tokens_decoder=added, chat_template=spec["chat_template"],
                  clean_up_tokenization_spaces=False, model_max_length=131072)
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, ensure_ascii=False, indent=2)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", choices=sorted(STYLES), default="qwen2")
    parser.add_argument("--train_file", required=True, help="CValues jsonl whose texts the BPE learns from")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args(argv)
    print(train_hf_tokenizer(corpus(args.train_file), args.output_dir, args.style, args.vocab_size))


if __name__ == "__main__":
    main()
