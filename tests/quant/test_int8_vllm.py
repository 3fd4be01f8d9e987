"""normswap_int8 end to end in real vLLM on CPU, on an in-tree Llama (transformers random init):

- quality: mean KL(bf16 || int8) of the full next-token distributions over the prompt < KL_MAX nats/token;
- every vLLM linear layer is int8, and holds exactly quantize() of the checkpoint tensors (independent: computed
  here from the safetensors file with the torch-only primitives, shards concatenated by the test);
- `lm_head: true`: the LM head too is int8 (quantize() of the checkpoint tensor), within the same KL bar (CPU; on
  a GPU the load fails saying it is CPU-only);
- offline checkpoint (`normswap quantize`) == online result, bit for bit, for channel, group and tensor;
- tensor parallel 2: the int8 weights re-assembled from both ranks equal TP 1's bit for bit; distributions within
  KL_MAX / 10; greedy text equal up to a divergence at a near-tie;
- misconfiguration fails at load with a message naming the problem.

With the CUDA vLLM wheel on a GPU the same tests run on the GPU path (vLLM's Machete/Marlin kernel), where the
int8 weights sit in the kernel's own layout: they are compared between loads as they are, not against quantize().

vLLM runs happen in a few subprocesses (tests/quant/int8_runner.py), several engines per process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant.llama_ckpt import make_llama_checkpoint
from utils import KV_CACHE_GB, random_prompts, shared_tokenizer
from vllm_normswap.runtime import forkserver
from vllm_normswap.checkpoints.quantize import quantize_checkpoint
from vllm_normswap.quant.primitives import quantize

KL_MAX = 0.01  # nats/token: the int8 method's quality bar (per-channel and per-group)
RUNNER = Path(__file__).with_name("int8_runner.py")
GROUP = 64
TIE_MARGIN = 0.05  # logprob gap under which a different greedy pick is rounding, not a bug (the parity tolerance)
ON_GPU = torch.cuda.is_available()  # the CUDA vLLM wheel: vLLM runs on the GPU


def prompts(n=3, vocab=512, seed=0):
    return random_prompts(n, seed, vocab=vocab, lengths=(24, 48))


def run_int8(specs, out: Path, env_extra=None):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GB, **(env_extra or {})}
    proc = forkserver.run([sys.executable, str(RUNNER), json.dumps(specs), str(out)], env=env, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return torch.load(out, weights_only=True), proc.stdout + proc.stderr  # vLLM logs to stdout


def mean_kl(p_runs, q_runs) -> float:
    kls = [(p.exp() * (p - q)).sum(-1) for p, q in zip(p_runs, q_runs)]
    return torch.cat(kls).mean().item()


def online(g):
    return {} if g == "channel" else {"quantization_config": {"quant_method": "normswap_int8", "granularity": g,
                                                              "group_size": GROUP}}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    src = make_llama_checkpoint(root / "bf16", shared_tokenizer())
    offline = {g: quantize_checkpoint(src, root / f"int8-{g}", g, GROUP) and root / f"int8-{g}"
               for g in ("channel", "group", "tensor")}
    return {"src": src, "offline": offline, "root": root}


@pytest.fixture(scope="module")
def llama_runs(llama):
    p = prompts()
    specs = [{"model": str(llama["src"]), "prompts": p, "dump_int8": True}]
    for g in ("channel", "group", "tensor"):
        specs.append({"model": str(llama["src"]), "prompts": p, "quantization": "normswap_int8",
                      "hf_overrides": online(g), "dump_int8": True})
        specs.append({"model": str(llama["offline"][g]), "prompts": p, "dump_int8": True})
    specs.append({"model": str(llama["src"]), "prompts": p, "quantization": "normswap_int8", "dump_int8": True,
                  "hf_overrides": {"quantization_config": {"quant_method": "normswap_int8", "lm_head": True}},
                  "expect_failure": ON_GPU})
    results, log = run_int8(specs, llama["root"] / "runs.pt")
    bf16 = results[0]
    return {"bf16": bf16, "lm_head": results[7], "log": log,
            **{g: {"online": results[1 + 2 * i], "offline": results[2 + 2 * i]}
               for i, g in enumerate(("channel", "group", "tensor"))}}


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_llama_kl_int8_vs_bf16(llama_runs, granularity):
    kl = mean_kl(llama_runs["bf16"]["prompt_logprobs"], llama_runs[granularity]["online"]["prompt_logprobs"])
    print(f"Llama {granularity}: mean KL(bf16 || int8) = {kl:.2e} nats/token")
    assert kl < KL_MAX


def test_llama_tensor_granularity_is_harsher(llama_runs):
    """Per-tensor is the harsh setting: it must cost more than per-channel (and still be a working model)."""
    kl_t = mean_kl(llama_runs["bf16"]["prompt_logprobs"], llama_runs["tensor"]["online"]["prompt_logprobs"])
    kl_c = mean_kl(llama_runs["bf16"]["prompt_logprobs"], llama_runs["channel"]["online"]["prompt_logprobs"])
    print(f"Llama tensor: mean KL = {kl_t:.2e} (channel {kl_c:.2e})")
    assert kl_c < kl_t < 10 * KL_MAX


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_offline_checkpoint_equals_online_bitwise(llama_runs, granularity):
    on = llama_runs[granularity]["online"]["int8"][0]["layers"]
    off = llama_runs[granularity]["offline"]["int8"][0]["layers"]
    assert on.keys() == off.keys() and len(on) == 8
    for name in on:
        assert torch.equal(on[name][0], off[name][0]), f"{name}: int8 weights differ"
        assert torch.equal(on[name][1], off[name][1]), f"{name}: scales differ"
    assert llama_runs[granularity]["online"]["greedy"] == llama_runs[granularity]["offline"]["greedy"]


def _expected_layer(tensors, layer, proj_names, granularity):
    """quantize() per checkpoint tensor, stacked the way vLLM merges q/k/v and gate/up."""
    qs, ss = [], []
    for proj in proj_names:
        w = tensors[f"{layer}.{proj}.weight"]
        q, s = quantize(w, granularity, GROUP)
        qs.append(q)
        ss.append(s.expand(w.shape[0], 1) if granularity == "tensor" else s)
    return torch.cat(qs), torch.cat(ss)


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_vllm_layers_hold_primitive_quantization(llama, llama_runs, granularity):
    tensors = load_file(str(llama["src"] / "model.safetensors"))
    state = llama_runs[granularity]["online"]["int8"][0]
    assert state["int8_layers"] == state["linear_layers"] == 8  # 2 layers x (qkv, o, gate_up, down)
    if state["kernel"]:
        pytest.skip(f"the int8 weights are in {state['kernel']}'s layout (offline == online is checked there)")
    merged = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.down_proj": ("mlp.down_proj",)}
    for i in range(2):
        for vllm_name, parts in merged.items():
            q, s = state["layers"][f"model.layers.{i}.{vllm_name}"]
            q_ref, s_ref = _expected_layer(tensors, f"model.layers.{i}", parts, granularity)
            assert q.dtype == torch.int8 and torch.equal(q, q_ref), vllm_name
            assert torch.equal(s, s_ref), vllm_name


def test_resident_weights_shrink(llama_runs):
    bf16 = llama_runs["bf16"]["int8"][0]["param_bytes"]
    int8 = llama_runs["channel"]["online"]["int8"][0]["param_bytes"]
    print(f"resident parameter bytes: bf16 {bf16}, int8 {int8} ({int8 / bf16:.2f}x)")
    # this toy model is embedding-heavy (vocab 512 x 256 twice): only the linear layers halve
    assert int8 < 0.8 * bf16


def test_int8_lm_head(llama, llama_runs):
    """`lm_head: true`: the head holds quantize() of the checkpoint's lm_head.weight per channel, the logits come
    from it (the distributions move off the linear-only int8 run), and the KL bar still holds. CPU only: on a GPU
    the load fails with a message saying so."""
    if ON_GPU:
        assert "lm_head: true is implemented on CPU only" in llama_runs["log"] + llama_runs["lm_head"]["failed"]
        return
    tensors = load_file(str(llama["src"] / "model.safetensors"))
    state = llama_runs["lm_head"]["int8"][0]
    assert state["int8_layers"] == state["linear_layers"] + 1
    q, s = state["layers"]["lm_head"]
    q_ref, s_ref = quantize(tensors["lm_head.weight"], "channel")
    assert q.dtype == torch.int8 and torch.equal(q[: len(q_ref)], q_ref) and torch.equal(s[: len(s_ref)], s_ref)
    linear_only = llama_runs["channel"]["online"]["prompt_logprobs"]
    with_head = llama_runs["lm_head"]["prompt_logprobs"]
    assert any(not torch.equal(a, b) for a, b in zip(linear_only, with_head)), "the int8 head was not used"
    kl = mean_kl(llama_runs["bf16"]["prompt_logprobs"], with_head)
    print(f"Llama channel + int8 LM head: mean KL(bf16 || int8) = {kl:.2e} nats/token")
    assert kl < KL_MAX
    bf16_bytes, head_bytes = llama_runs["bf16"]["int8"][0]["param_bytes"], state["param_bytes"]
    assert head_bytes < llama_runs["channel"]["online"]["int8"][0]["param_bytes"] < bf16_bytes


# ---- tensor parallel ----

def _unshard(rank_states, name, widths, row_parallel):
    """Reassemble TP rank shards of one layer into the TP 1 layout."""
    qs = [st["layers"][name][0] for st in rank_states]
    ss = [st["layers"][name][1] for st in rank_states]
    if row_parallel:
        scale = ss[0] if ss[0].shape[1] == 1 else torch.cat(ss, dim=1)
        return torch.cat(qs, dim=1), scale
    tp = len(qs)
    split_q = [q.split([w // tp for w in widths]) for q in qs]
    split_s = [s.split([w // tp for w in widths]) for s in ss]
    q = torch.cat([torch.cat([sq[j] for sq in split_q]) for j in range(len(widths))])
    s = torch.cat([torch.cat([sp[j] for sp in split_s]) for j in range(len(widths))])
    return q, s


@pytest.fixture(scope="module")
def tp2_runs(llama):
    p = prompts()
    specs = [{"model": str(llama["src"]), "prompts": p, "quantization": "normswap_int8", "tp": 2,
              "hf_overrides": online(g), "dump_int8": True} for g in ("channel", "tensor")]
    results, _ = run_int8(specs, llama["root"] / "tp2.pt", {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    return dict(zip(("channel", "tensor"), results))


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_tp2_equals_tp1(llama_runs, tp2_runs, granularity):
    tp1 = llama_runs[granularity]["online"]
    tp2 = tp2_runs[granularity]
    assert len(tp2["int8"]) == 2
    layout = {"self_attn.qkv_proj": ([256, 128, 128], False), "self_attn.o_proj": ([256], True),
              "mlp.gate_up_proj": ([512, 512], False), "mlp.down_proj": ([256], True)}
    for i in range(2):
        for short, (widths, row_parallel) in layout.items():
            name = f"model.layers.{i}.{short}"
            q, s = _unshard(tp2["int8"], name, widths, row_parallel)
            assert torch.equal(q, tp1["int8"][0]["layers"][name][0]), f"{name}: TP2 int8 weights differ"
            assert torch.equal(s, tp1["int8"][0]["layers"][name][1]), f"{name}: TP2 scales differ"
    # same weights, different reduction order (partial sums all-reduced): the distributions agree closely, and
    # greedy text is identical up to a divergence that may only happen at a near-tie of TP 1's top two tokens
    kl = mean_kl(tp1["prompt_logprobs"], tp2["prompt_logprobs"])
    print(f"TP2 vs TP1 ({granularity}): mean KL {kl:.2e} nats/token")
    assert kl < KL_MAX / 10
    for a, b, top2 in zip(tp1["greedy"], tp2["greedy"], tp1["greedy_top2"]):
        if a != b:
            k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            margin = top2[k][0] - top2[k][1]
            assert margin < TIE_MARGIN, f"TP2 diverged at step {k} where TP1's top-2 margin is {margin:.3f}"


# ---- misconfiguration ----

def test_misconfiguration_fails_at_load_with_clear_message(llama, tmp_path):
    bad_ckpt = tmp_path / "scales-mismatch"
    shutil.copytree(llama["offline"]["channel"], bad_ckpt)
    cfg = json.loads((bad_ckpt / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights.update(strategy="group", group_size=GROUP)  # config says groups of 64; tensors hold one scale per row
    (bad_ckpt / "config.json").write_text(json.dumps(cfg))
    p = prompts(1)
    src = str(llama["src"])
    specs = [
        {"model": src, "prompts": p, "quantization": "normswap_int8", "expect_failure": True,
         "hf_overrides": {"quantization_config": {"quant_method": "normswap_int8", "granularity": "row"}}},
        {"model": src, "prompts": p, "quantization": "normswap_int8", "expect_failure": True,
         "hf_overrides": {"quantization_config": {"quant_method": "normswap_int8", "granularity": "group",
                                                  "group_size": 96}}},
        {"model": str(bad_ckpt), "prompts": p, "expect_failure": True},
        {"model": src, "prompts": p, "quantization": "normswap_int8", "expect_failure": True,
         "hf_overrides": {"quantization_config": {"quant_method": "normswap_int8", "lm_head": "yes"}}},
    ]
    results, stderr = run_int8(specs, tmp_path / "bad.pt")
    text = stderr + "\n".join(r.get("failed", "") for r in results)
    assert "unknown granularity 'row'; allowed: channel, group, tensor" in text
    assert "group_size 96 does not divide the layer input size 256" in text
    assert "weight_scale has shape" in text and "the scales do not match the weights" in text
    assert "lm_head must be true or false, got 'yes'" in text
