"""Local, offline tokenizer loading: a SentencePiece `tokenizer.model` file or a directory holding one.

Nothing is ever downloaded. The ids equal mindformers' LlamaTokenizer(vocab_file=...) without special tokens,
the tokenizer the tutorial uses, but batched and multi-threaded.
"""
import os
from typing import List, Sequence

from mindrlhf.errors import ConfigError

TOKENIZER_FILENAMES = ("tokenizer.model",)


def resolve_tokenizer_path(model: str) -> str:
    """The tokenizer.model path for --model/--tokenizer; a hub name gets a clear 'pass a local path' error."""
    if model and os.path.isfile(model):
        return model
    if model and os.path.isdir(model):
        for name in TOKENIZER_FILENAMES:
            candidate = os.path.join(model, name)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"tokenizer directory '{model}' holds no tokenizer.model; "
                          "pass the path of a SentencePiece tokenizer.model file or a directory holding one")
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

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        return self.sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(model: str, num_threads: int = -1) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model, num_threads)
