"""Local, offline tokenizer loading: a SentencePiece `tokenizer.model` (file or a directory holding one), or a
Hugging Face tokenizer folder (`tokenizer.json` + `tokenizer_config.json`, Llama 3 / Qwen2.5 style).

Nothing is ever downloaded. SentencePiece ids equal mindformers' LlamaTokenizer(vocab_file=...) without special
tokens, the tokenizer the tutorial uses; Hugging Face ids equal the `tokenizers` library's own. Both are batched
and multi-threaded behind one `encode(texts)`.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

from mindrlhf.errors import ConfigError

TOKENIZER_FILENAMES = ("tokenizer.model",)
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The special-token attributes transformers passes to a chat template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def resolve_tokenizer_path(model: str) -> str:
    """The tokenizer.model path for --model/--tokenizer; a hub name gets a clear 'pass a local path' error."""
    if model and os.path.isfile(model):
        return model
    if model and os.path.isdir(model):
        for name in TOKENIZER_FILENAMES + (HF_TOKENIZER_FILE,):
            candidate = os.path.join(model, name)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"tokenizer directory '{model}' holds no tokenizer.model or tokenizer.json; "
                          "pass the path of a SentencePiece tokenizer.model file, a Hugging Face tokenizer.json, or "
                          "a directory holding one")
    raise ConfigError(f"tokenizer '{model}' is not a local file or directory. mindrlhf never downloads "
                      "tokenizers or weights: pass a local path, e.g. --model /path/to/llama2/tokenizer.model")


class SentencePieceTokenizer:
    """Encode without special tokens, as the tutorial's conversion does (add_special_tokens=False)."""

    def __init__(self, path: str, num_threads: int = -1):
        import sentencepiece as spm

        self.path = resolve_tokenizer_path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.num_threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, texts: Sequence[str], special_tokens: bool = True) -> List[List[int]]:
        """special_tokens is accepted for the common interface: a tokenizer.model carries no BOS/EOS rule and
        the tutorial adds none, so neither does this."""
        if not texts:
            return []
        return self.sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    @property
    def default_pad_id(self) -> int:
        return 2  # the tutorial's pad (Llama 2's eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def _token_content(value) -> Optional[str]:
    """A tokenizer_config.json special-token entry: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer folder read with the `tokenizers` library: batched over all cores.

    BOS/EOS as transformers adds them to plain text: tokenizer_config.json's add_bos_token/add_eos_token when
    given (LlamaTokenizerFast), else tokenizer.json's own post-processor (PreTrainedTokenizerFast). The special
    tokens and the chat template (chat_template.jinja first, as transformers) are what templates render with.
    """

    def __init__(self, path: str, num_threads: int = -1):
        self.path = resolve_tokenizer_path(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        if num_threads > 0:  # rayon reads it when the tokenizers thread pool first starts
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        from tokenizers import Tokenizer

        try:
            self.tk = Tokenizer.from_file(self.path)
        except Exception as err:  # pylint: disable=broad-except  (the Rust side raises plain Exception)
            raise ConfigError(f"{self.path}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
        self.tk.no_truncation()  # conversion truncates itself, after the template
        self.tk.no_padding()
        self.config = self._read_json(os.path.join(self.folder, HF_CONFIG_FILE))
        legacy = self._read_json(os.path.join(self.folder, "special_tokens_map.json"))
        self.special_tokens: Dict[str, object] = {}
        for key in SPECIAL_TOKEN_KEYS:
            content = _token_content(self.config.get(key, legacy.get(key)))
            if content is not None:
                self.special_tokens[key] = content
        extra = self.config.get("additional_special_tokens", legacy.get("additional_special_tokens")) or []
        if extra:
            self.special_tokens["additional_special_tokens"] = [_token_content(t) for t in extra]
        self.add_bos = self.config.get("add_bos_token")
        self.add_eos = self.config.get("add_eos_token")
        self.chat_template = self._chat_template()

    @staticmethod
    def _read_json(path: str) -> dict:
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None

    def _chat_template(self) -> Optional[str]:
        jinja = os.path.join(self.folder, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as fh:
                return fh.read()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}], as transformers saves several
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, key: str) -> Optional[int]:
        """The id of a special token by attribute name (eos_token, pad_token, ...), None when unset."""
        content = self.special_tokens.get(key)
        return self.tk.token_to_id(content) if isinstance(content, str) else None

    @property
    def eos_id(self) -> Optional[int]:
        return self.token_id("eos_token")

    @property
    def default_pad_id(self) -> Optional[int]:
        """pad_token, else eos_token (as TRL); conversion refuses a pad id that occurs inside the text."""
        pad = self.token_id("pad_token")
        return pad if pad is not None else self.eos_id

    def encode(self, texts: Sequence[str], special_tokens: bool = True) -> List[List[int]]:
        """special_tokens: add BOS/EOS as transformers does for plain text; False for text that already
        holds them (a rendered chat template, as apply_chat_template tokenizes)."""
        if not texts:
            return []
        explicit = self.add_bos is not None or self.add_eos is not None
        post_process = special_tokens and not explicit
        encode = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        ids = [e.ids for e in encode(list(texts), add_special_tokens=post_process)]
        if special_tokens and explicit:
            bos = [self.token_id("bos_token")] if self.add_bos and self.token_id("bos_token") is not None else []
            eos = [self.eos_id] if self.add_eos and self.eos_id is not None else []
            ids = [bos + x + eos for x in ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(model: str, num_threads: int = -1):
    """SentencePieceTokenizer for a tokenizer.model (or a folder holding one), HFTokenizer for a tokenizer.json
    (or a folder holding one and no tokenizer.model)."""
    if resolve_tokenizer_path(model).endswith(".json"):
        return HFTokenizer(model, num_threads)
    return SentencePieceTokenizer(model, num_threads)
