"""Byte-level BPE tokenizer trained locally with `tokenizers` and saved in Hugging Face format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_hf_tokenizer(tok, dst) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by transformers' AutoTokenizer (and so by vLLM)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS,
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def stdlib_sample(max_chars: int = 400_000) -> list[str]:
    """A deterministic sample of the running interpreter's standard-library sources: real text on every machine."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out
