"""`normswap zoo`: the embedded default models, one per option, trained on the same data in the same order.

    normswap zoo build [--quick] [--corpus PATH] [--out DIR]   train the four options (resumable) and write them
    normswap zoo path OPTION                                   print the committed checkpoint dir of an option

The committed zoo (vllm_normswap/zoo/<option>/) is what `zoo build` writes with no flags. All four share the
corpus, tokenizer, token budget, data order and init seed; only (norm_type, ffn_act) and the SwiGLU width rule
(same parameter count, +-2%) differ. Training goes through the trainer `normswap heal` uses (train.py:
transformers' Trainer); the committed weights came from the hand-written loop it replaced, and the two were
checked equivalent (docs/zoo.md). Training state is cached under $VLLM_NORMSWAP_CACHE (default
~/.cache/vllm-normswap)/zoo/<key>/, key = hash of corpus + shapes + schedule, so an interrupted build resumes and
a finished option is not retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
DATA_SEED = 1234  # data order, shared by all options
EVAL_WINDOWS_PER_DOC = 2  # held-out evaluation: this many windows from every held-out file (dataset.spread_windows)
FORMAT = 3  # bump when the cache layout or training code changes meaning (3: Trainer checkpoints, train.py)

# shape (GELU width; SwiGLU options get swiglu_width) and schedule of the committed zoo, and of the --quick smoke run
FULL = {"shape": dict(hidden_size=192, layers=4, heads=3, vocab_size=4096, max_positions=256, gelu_width=768),
        "spec": dict(steps=600, batch_size=8, ctx=256, lr=3e-3, warmup=30),
        "tokenizer_chars": 3_000_000, "heldout_windows": 48}
QUICK = {"shape": dict(hidden_size=64, layers=1, heads=1, vocab_size=512, max_positions=64, gelu_width=384),
         "spec": dict(steps=12, batch_size=4, ctx=64, lr=3e-3, warmup=3),
         "tokenizer_chars": 300_000, "heldout_windows": 8}


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_NORMSWAP_CACHE", Path.home() / ".cache" / "vllm-normswap")) / "zoo"


def option_dir(option: str, root: Path = ZOO_DIR) -> Path:
    from vllm_normswap.registry import check_choice, OPTIONS

    check_choice("option", option, tuple(OPTIONS))
    return root / option


def _prepare(plan: dict, corpus, cache: Path, log) -> tuple:
    """Tokenizer + train/held-out windows, cached in ``cache``."""
    import torch
    from tokenizers import Tokenizer

    from vllm_normswap.checkpoints.dataset import encode_stream, shuffled_docs, windows
    from vllm_normswap.checkpoints.tokenizer import train_bpe

    tok_path, data_path = cache / "tokenizer.json", cache / "data.pt"
    if tok_path.is_file() and data_path.is_file():
        return Tokenizer.from_file(str(tok_path)), torch.load(data_path, weights_only=True)
    spec, shape = plan["spec"], plan["shape"]
    docs = shuffled_docs(corpus.train, DATA_SEED)
    sample, total = [], 0
    for doc in docs:  # tokenizer trained on a seeded sample of the training documents
        sample.append(doc)
        total += len(doc)
        if total >= plan["tokenizer_chars"]:
            break
    log(f"training BPE tokenizer (vocab {shape['vocab_size']}) on {total:,} chars")
    tok = train_bpe(sample, shape["vocab_size"])
    need = spec["steps"] * spec["batch_size"] * spec["ctx"] + 1
    log(f"tokenizing {need:,} training tokens and {plan['heldout_windows']} held-out windows")
    train = windows(encode_stream(tok, docs, need), spec["ctx"])
    heldout_need = plan["heldout_windows"] * spec["ctx"] + 1
    heldout = windows(encode_stream(tok, shuffled_docs(corpus.heldout, DATA_SEED), heldout_need), spec["ctx"])
    if train.shape[0] < spec["steps"] * spec["batch_size"]:
        log(f"note: corpus gives {train.shape[0]} windows < {spec['steps'] * spec['batch_size']} needed: "
            "the run repeats data (several epochs)")
    data = {"train": train, "heldout": heldout[:plan["heldout_windows"]]}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, data_path)
    tok.save(str(tok_path))
    return tok, data


def build(out: Path = ZOO_DIR, corpus_path=None, quick: bool = False, progress: bool = True,
          options=None, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    import torch

    from vllm_normswap.checkpoints.corpus import load_corpus
    from vllm_normswap.checkpoints.dataset import batch_order, shuffled_docs, spread_windows
    from vllm_normswap.checkpoints.evaluate import evaluate, residual_mean_profile, token_byte_lengths
    from vllm_normswap.checkpoints.files import load_reference, save_checkpoint
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.checkpoints.tokenizer import save_hf_tokenizer
    from vllm_normswap.checkpoints.train import TrainSpec, train
    from vllm_normswap.model.config import parameter_count
    from vllm_normswap.registry import OPTIONS

    plan = QUICK if quick else FULL
    spec = TrainSpec(**plan["spec"])
    corpus = load_corpus(corpus_path)
    key_src = json.dumps({"format": FORMAT, "corpus": corpus.fingerprint, "plan": plan, "data_seed": DATA_SEED},
                         sort_keys=True)
    cache = cache_root() / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    log(f"corpus: {corpus.describe()}; cache: {cache}")
    tok, data = _prepare(plan, corpus, cache, log)
    order = batch_order(data["train"].shape[0], spec.batch_size, spec.steps, DATA_SEED)
    byte_lengths = token_byte_lengths(tok)
    eval_windows = spread_windows(tok, shuffled_docs(corpus.heldout, DATA_SEED), spec.ctx, EVAL_WINDOWS_PER_DOC)
    summary = {"corpus": corpus.describe(), "train_tokens": spec.tokens, "spec": dataclasses.asdict(spec),
               "shape": plan["shape"], "options": {}}
    for option in options or OPTIONS:
        arch = make_arch(option, **plan["shape"])
        done_path = cache / f"{option}.done.pt"
        if done_path.is_file():
            result = torch.load(done_path, weights_only=True)
            log(f"{option}: trained already (cache)")
        else:
            log(f"{option}: training {spec.steps} steps")
            tensors, train_log = train(arch, data["train"], order, spec, checkpoint_dir=cache / f"{option}.trainer",
                                       progress=progress)
            result = {"tensors": tensors, "log": train_log}
            torch.save(result, done_path)
            shutil.rmtree(cache / f"{option}.trainer", ignore_errors=True)
        dst = save_checkpoint(out / option, arch, result["tensors"])
        save_hf_tokenizer(tok, dst)
        model = load_reference(dst)  # score the bf16 weights actually written, not the fp32 masters
        metrics = evaluate(model, eval_windows, byte_lengths, data["train"][:, :-1])
        losses = [round(x, 4) for x in result["log"]["losses"]]
        row = {"option": option, "parameters": parameter_count(arch), "intermediate_size": arch.intermediate_size,
               **metrics, "train_seconds": round(result["log"]["seconds"], 1),
               "train_tokens_per_s": result["log"]["tokens_per_s"],
               "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
               "loss_curve_every_10": losses[::10],
               "residual_profile": residual_mean_profile(model, data["heldout"][:8])}
        (dst / "zoo.json").write_text(json.dumps(row, indent=1) + "\n")
        summary["options"][option] = {k: v for k, v in row.items() if k not in ("loss_curve_every_10",
                                                                               "residual_profile")}
        log(f"{option}: ppl {metrics['ppl']} (unigram {metrics['unigram_ppl']}, x{metrics['ppl_ratio']}; "
            f"held-out's own unigram {metrics['oracle_unigram_ppl']}, x{metrics['oracle_ppl_ratio']}), "
            f"{metrics['bits_per_byte']} bits/byte")
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_arguments(p) -> None:
    from vllm_normswap.registry import OPTIONS

    sub = p.add_subparsers(dest="zoo_command", required=True, metavar="build|path")
    b = sub.add_parser("build", help="train the four options and write them (reproduces the committed zoo)")
    b.add_argument("--quick", action="store_true", help="a tiny smoke-test zoo (about a minute, not committed)")
    b.add_argument("--corpus", default=None, help="text files / JSONL ({\"text\": ...} per line), a file or a dir "
                                                  "(None = this Python's standard-library sources)")
    b.add_argument("--out", default=None, help="output dir (None = the package's zoo dir; required with "
                                               "--quick or --corpus, so the committed zoo is not overwritten)")
    b.add_argument("--option", action="append", default=None, choices=list(OPTIONS),
                   help="build only this option (repeatable; None = all)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    path = sub.add_parser("path", help="print the committed checkpoint dir of an option")
    path.add_argument("option", choices=list(OPTIONS), help="the option whose checkpoint dir to print")


def run(args) -> int:
    if args.zoo_command == "path":
        d = option_dir(args.option)
        if not (d / "config.json").is_file():
            raise SystemExit(f"no committed zoo checkpoint at {d}; run `normswap zoo build` to train it")
        print(d)
        return 0
    if args.out is None and (args.quick or args.corpus):
        raise SystemExit("--quick / --corpus build a different zoo: pass --out DIR (the committed zoo stays)")
    t0 = time.perf_counter()
    summary = build(Path(args.out) if args.out else ZOO_DIR, args.corpus, args.quick, not args.no_progress,
                    args.option)
    summary["build_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=1))
    return 0
