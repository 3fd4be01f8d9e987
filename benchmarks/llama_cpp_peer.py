"""llama.cpp Q8_0 peer for the int8 benchmark: the same Llama shape, timed in llama.cpp; prints one JSON object.

    python benchmarks/llama_cpp_peer.py [--threads 1 2] [--batches 1,8] [--layers 16 --hidden 2048 --ffn 5632
                                        --vocab 44032 --heads H --kv-heads H] [--repeats 3] [--gguf-dir DIR]

Why this is the peer: llama.cpp's Q8_0 (int8 weights, one fp16 scale per 32 weights, int8 x int8 dot products
with VNNI where the CPU has it) is the reference point for int8 weight-only decode on a CPU. The model is the
same shape as bench_int8.py's vLLM model (its `write_config`, so heads, eps, rope theta and context length match),
with random weights (std 0.02), written as a GGUF file laid out as `convert_hf_to_gguf.py --outtype q8_0` writes
a Llama: every 2-D weight (token_embd, attention and FFN projections, output) in Q8_0, the RMSNorm weights in F32,
and a dummy SPM ("llama") vocabulary of `vocab` tokens, since only token ids are ever fed. The file is generated
once per shape into ~/.cache/vllm_normswap/peer/ (or --gguf-dir) and reused.

Figures, per thread count (n_threads = n_threads_batch), each the median of --repeats timed runs after untimed
warm-up, through llama-cpp-python's low-level API (llama_decode on a llama_batch, no Python-side sampling cost
beyond a numpy argmax per step, which stands in for greedy sampling):
- decode_tok_s_batch1: 64 tokens generated one at a time after a 16-token prompt (4 untimed tokens first);
- decode_tok_s_batchB (B > 1 in --batches): B sequences (seq ids 0..B-1, each with its own 16-token prompt and
  its own KV stream, kv_unified off as llama.cpp's default) advanced together, one token each per llama_decode,
  for 16 steps; tok/s counts all B tokens of a step;
- prefill_tok_s_512: one 512-token prompt in a single llama_decode with n_batch = n_ubatch = 512, the KV cache
  cleared before each repeat, logits for the last token only.
The keys are the names bench_int8.py uses for the vLLM figures. Everything else is llama.cpp's defaults
(flash attention "auto", f16 KV cache, mmap, CPU weight repacking where ggml has it). Each run's samples are in
the output too: with as many threads as cores, ggml's OpenMP threads spin-wait between ops, so any other load on
the machine shows up as single runs several times slower.

Needs llama-cpp-python (built from source: CMAKE_ARGS="-DGGML_NATIVE=ON", llama.cpp's default, for this CPU's
AVX-512/VNNI) and gguf; the project's `bench` extra.

measure() is the importable entry point (bench_int8.py's config dict in, result dict out); llama_cpp, gguf and
numpy are imported only inside it, so importing this module needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 16  # decode prompts, as bench_int8.py's vLLM decode runs
WARMUP_STEPS = 4
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm_normswap" / "peer"
FORMAT_TAG = "q8_0v1"  # bump when the GGUF layout written here changes, so cached files are regenerated


# ---------------- shape ----------------

def shape_key(cfg: dict) -> dict:
    """The fields of bench_int8.py's HF-style config that the GGUF file depends on."""
    d = cfg["hidden_size"]
    return {"hidden": d, "ffn": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"], "vocab": cfg["vocab_size"],
            "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5), "rope_theta": cfg.get("rope_theta", 10000.0),
            "context_length": cfg.get("max_position_embeddings", 2048)}


def param_count(s: dict) -> int:
    d, f, n, v = s["hidden"], s["ffn"], s["layers"], s["vocab"]
    kv = d // s["heads"] * s["kv_heads"]
    return n * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d


# ---------------- GGUF ----------------

def gguf_path_for(s: dict, directory: Path = CACHE_DIR, seed: int = 0) -> Path:
    name = (f"llama_{FORMAT_TAG}_L{s['layers']}_d{s['hidden']}_f{s['ffn']}_h{s['heads']}_kv{s['kv_heads']}"
            f"_v{s['vocab']}_ctx{s['context_length']}_eps{s['rms_norm_eps']:g}_theta{s['rope_theta']:g}_s{seed}.gguf")
    return directory / name


def write_gguf(s: dict, path: Path, seed: int = 0, std: float = 0.02) -> None:
    """Random-weight Llama in llama.cpp's layout. Streams one tensor at a time (the largest, the 44032 x 2048
    embedding, is 360 MB as float32), so memory stays far below the 1 GB file."""
    import gguf
    import numpy as np

    d, f, n, v, h, kvh = s["hidden"], s["ffn"], s["layers"], s["vocab"], s["heads"], s["kv_heads"]
    head_dim = d // h
    q8 = gguf.GGMLQuantizationType.Q8_0
    block, type_size = gguf.GGML_QUANT_SIZES[q8]  # 32 weights -> 34 bytes (fp16 scale + 32 int8)

    # (name, HF-style shape (out, in) or (n,), quantized?) in the order convert_hf_to_gguf writes them
    tensors = [("token_embd.weight", (v, d), True)]
    for i in range(n):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (d,), False), (p + "attn_q.weight", (d, d), True),
                    (p + "attn_k.weight", (kvh * head_dim, d), True), (p + "attn_v.weight", (kvh * head_dim, d), True),
                    (p + "attn_output.weight", (d, d), True), (p + "ffn_norm.weight", (d,), False),
                    (p + "ffn_gate.weight", (f, d), True), (p + "ffn_up.weight", (f, d), True),
                    (p + "ffn_down.weight", (d, f), True)]
    tensors += [("output_norm.weight", (d,), False), ("output.weight", (v, d), True)]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random-llama-{param_count(s) / 1e9:.2f}B-q8_0")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(s["context_length"])
    w.add_embedding_length(d)
    w.add_block_count(n)
    w.add_feed_forward_length(f)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(h)
    w.add_head_count_kv(kvh)
    w.add_layer_norm_rms_eps(s["rms_norm_eps"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_vocab_size(v)
    # SPM vocabulary: <unk>, <s>, </s>, the 256 byte tokens llama.cpp looks up (e.g. its newline token), then
    # unique dummy pieces up to `vocab`
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    if v < len(toks) + 1:
        raise ValueError(f"vocab must be > {len(toks)}")
    toks += [f"t{i}" for i in range(len(toks), v)]
    types += [gguf.TokenType.NORMAL] * (v - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * v)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    for name, shape, quant in tensors:
        if quant:
            rows, cols = shape
            if cols % block:
                raise ValueError(f"{name}: {cols} columns is not a multiple of the Q8_0 block ({block})")
            w.add_tensor_info(name, (rows, cols // block * type_size), np.dtype(np.uint8),
                              rows * cols // block * type_size, raw_dtype=q8)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, quant in tensors:
        if quant:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= std
            w.write_tensor_data(gguf.quants.quantize(x, q8))
        else:
            w.write_tensor_data(np.ones(shape, np.float32))  # RMSNorm's initial weight
    w.close()


def ensure_gguf(s: dict, directory: Path = CACHE_DIR, seed: int = 0) -> tuple[Path, bool]:
    """(path, whether it was generated now). Written under a temporary name and renamed, so an interrupted run
    never leaves a truncated file that a later run would reuse."""
    path = gguf_path_for(s, directory, seed)
    if path.exists():
        return path, False
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".gguf.part")
    os.close(fd)
    try:
        write_gguf(s, Path(tmp), seed)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache private to whoever generated it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, True


# ---------------- machine ----------------

def cpu_info() -> dict:
    return _sibling("machine").cpu_info()


# ---------------- llama.cpp timing ----------------

class _Runner:
    """One loaded model; contexts are made per (threads, sequences) so each figure has llama.cpp's default
    per-sequence KV layout for its batch."""

    def __init__(self, path: Path, vocab: int):
        import llama_cpp
        import numpy as np

        self.lc, self.np, self.vocab = llama_cpp, np, vocab
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.ctx = self.batch = None

    def open(self, threads: int, n_seq: int, n_ctx_seq: int, n_batch: int) -> None:
        self.close_ctx()
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_seq
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def close_ctx(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.lc.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self.close_ctx()
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, toks, pos, seqs, want) -> None:
        b = self.batch
        for i, (t, p, s, o) in enumerate(zip(toks, pos, seqs, want)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, o
            b.seq_id[i][0] = s
        b.n_tokens = len(toks)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, rows: int):
        return self.np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(rows, self.vocab))

    def prompt(self, n_tokens: int, seq: int, salt: int) -> list[int]:
        return [(7 * seq + 13 * j + salt) % (self.vocab - 10) + 5 for j in range(n_tokens)]

    def decode_run(self, n_seq: int, steps: int, salt: int) -> tuple[float, bool]:
        """Seconds for `steps` decode steps of n_seq sequences (after prompt + warm-up), and whether the last
        logits were all finite."""
        self.clear()
        toks, pos, seqs, want = [], [], [], []
        for s in range(n_seq):
            toks += self.prompt(PROMPT_LEN, s, salt)
            pos += range(PROMPT_LEN)
            seqs += [s] * PROMPT_LEN
            want += [0] * (PROMPT_LEN - 1) + [1]
        self.decode(toks, pos, seqs, want)
        nxt = self.logits(n_seq).argmax(axis=1).tolist()
        all_seqs, ones = list(range(n_seq)), [1] * n_seq
        t0 = 0.0
        for step in range(WARMUP_STEPS + steps):
            if step == WARMUP_STEPS:
                t0 = time.perf_counter()
            self.decode(nxt, [PROMPT_LEN + step] * n_seq, all_seqs, ones)
            nxt = self.logits(n_seq).argmax(axis=1).tolist()  # reading logits waits for the step to finish
        dt = time.perf_counter() - t0
        return dt, bool(self.np.isfinite(self.logits(n_seq)).all())

    def prefill_run(self, n_tokens: int, salt: int) -> float:
        self.clear()
        toks = self.prompt(n_tokens, 0, salt)
        t0 = time.perf_counter()
        self.decode(toks, range(n_tokens), [0] * n_tokens, [0] * (n_tokens - 1) + [1])
        self.lc.llama_synchronize(self.ctx)
        return time.perf_counter() - t0


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def measure(shape: dict, threads: list[int], batches: list[int], prefill_tokens: int = 512,
            decode_tokens: int = 64, batched_steps: int = 16, repeats: int = 3, gguf_dir: Path | None = None,
            seed: int = 0, verbose: bool = False) -> dict:
    """Time llama.cpp on a random Q8_0 Llama of `shape`, bench_int8.py's HF-style config dict (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size; rms_norm_eps,
    rope_theta, max_position_embeddings optional). Returns the module docstring's figures per thread count."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(verbose)  # llama.cpp's load/context logs otherwise go to stderr
    s = shape_key(shape)
    t = time.perf_counter()
    path, generated = ensure_gguf(s, gguf_dir or CACHE_DIR, seed)
    gen_s = time.perf_counter() - t

    out: dict = {
        "engine": "llama.cpp", "quantization": "Q8_0", "llama_cpp_python": llama_cpp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_info(), "ggml_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "gguf": {"path": str(path), "bytes": path.stat().st_size, "generated_now": generated,
                 "generate_s": round(gen_s, 1) if generated else None},
        "shape": s | {"params": param_count(s)},
        "settings": {"prompt_len": PROMPT_LEN, "warmup_steps": WARMUP_STEPS, "decode_tokens_batch1": decode_tokens,
                     "decode_steps_batched": batched_steps, "prefill_tokens": prefill_tokens, "repeats": repeats,
                     "statistic": "median", "flash_attn": "auto (llama.cpp default)", "kv_cache": "f16"},
        "threads": {},
    }
    r = _Runner(path, s["vocab"])
    try:
        for th in threads:
            res: dict = {}
            samples: dict = {}
            # batch 1 and prefill share one single-sequence context (n_ctx 1024 as vLLM's max_model_len)
            r.open(th, 1, _ceil(max(1024, prefill_tokens, PROMPT_LEN + WARMUP_STEPS + decode_tokens), 256),
                   max(512, prefill_tokens))
            if 1 in batches:
                r.decode_run(1, 4, salt=99)  # warm-up: first-call allocations, weight pages
                runs = [r.decode_run(1, decode_tokens, salt=10 + i) for i in range(repeats)]
                if not all(ok for _, ok in runs):
                    raise RuntimeError("non-finite logits at batch-1 decode")
                samples["decode_tok_s_batch1"] = [decode_tokens / dt for dt, _ in runs]
            r.prefill_run(prefill_tokens, salt=98)  # warm-up: allocates the 512-token compute buffers
            samples[f"prefill_tok_s_{prefill_tokens}"] = [prefill_tokens / r.prefill_run(prefill_tokens, salt=30 + i)
                                                          for i in range(repeats)]
            for b in sorted(set(batches) - {1}):
                r.open(th, b, _ceil(PROMPT_LEN + WARMUP_STEPS + batched_steps, 256), max(512, b * PROMPT_LEN))
                r.decode_run(b, 2, salt=97)
                runs = [r.decode_run(b, batched_steps, salt=20 + i) for i in range(repeats)]
                if not all(ok for _, ok in runs):
                    raise RuntimeError(f"non-finite logits at batch-{b} decode")
                samples[f"decode_tok_s_batch{b}"] = [b * batched_steps / dt for dt, _ in runs]
            res["logits_finite"] = True  # every decode run above checked its last logits
            for k, v in samples.items():
                res[k] = round(statistics.median(v), 2)
            res["samples"] = {k: [round(x, 2) for x in v] for k, v in samples.items()}
            out["threads"][str(th)] = res
    finally:
        r.close()
    return out


# ---------------- CLI ----------------

def _sibling(name: str):
    """A module next to this file (benchmarks/ is not a package): bench_int8 (its config and sizes) or machine."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def bench_int8_shape(a: argparse.Namespace) -> dict:
    """bench_int8.py's own config dict for these sizes (its write_config decides heads and the rest), with
    --heads / --kv-heads overriding it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _sibling("bench_int8").write_config(Path(tmp), a)
    if a.heads:
        cfg["num_attention_heads"] = a.heads
    if a.kv_heads:
        cfg["num_key_value_heads"] = a.kv_heads
    return cfg


def main() -> int:
    defaults = _sibling("bench_int8").parser()  # the vLLM benchmark's sizes are the defaults here
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("layers", "hidden", "ffn", "vocab"):
        ap.add_argument(f"--{flag}", type=int, default=defaults.get_default(flag))
    ap.add_argument("--heads", type=int, help="default: bench_int8.py's (hidden // 64)")
    ap.add_argument("--kv-heads", type=int, help="default: bench_int8.py's (= heads)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", default=defaults.get_default("batches"), help="decode batch sizes, comma-separated")
    ap.add_argument("--decode-tokens", type=int, default=64, help="timed batch-1 decode tokens")
    ap.add_argument("--batched-steps", type=int, default=16, help="timed decode steps at batch > 1")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's logs")
    a = ap.parse_args()
    res = measure(bench_int8_shape(a), a.threads, [int(b) for b in a.batches.split(",")], a.prefill_tokens,
                  a.decode_tokens, a.batched_steps, a.repeats, a.gguf_dir, a.seed, a.verbose)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
