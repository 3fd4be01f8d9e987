"""The transformers classes (model/hf_model.py) against vLLM's model and the pure-torch reference, in fp32.

- logprobs: the HF model's prompt logprobs equal vLLM's (float32, eager) and the reference's within TOL nats per
  token, for the four options (the test checkpoints spread rope, GQA, an untied head and missing biases over
  them, utils.OPTION_VARIANTS) and for the embedded zoo (reference only: no extra engine);
- generate(): greedy, a left-padded batch with the KV cache, gives vLLM's greedy tokens; where it differs, the
  step must be a near-tie (top-1/top-2 margin below MARGIN), as fp32 rounding can flip only those;
- save_pretrained: the output directory is served by vLLM unchanged, with the original's logprobs within TOL;
- checkpoints `normswap convert` wrote from GPT-2, OPT and Llama give their source model's logits;
- right padding with attention_mask gives the unpadded logits on the real tokens; labels give the shifted cross
  entropy with -100 ignored, computed here from the reference's logits;
- lm-eval's ``hf`` backend loads a zoo checkpoint through the registered Auto classes and scores a local
  multiple-choice task; its log-likelihoods equal the reference's within TOL.

All vLLM engines (four options, four round trips) run in one offline-runner process: one vLLM import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from utils import random_prompts, run_vllm_offline, shared_tokenizer
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.checkpoints.zoo import option_dir
from vllm_normswap.model.hf_model import NormSwapForCausalLM
from vllm_normswap.registry import OPTIONS

TOL = 1e-4  # nats per token: fp32 against fp32, only summation order differs
MARGIN = 1e-3  # a greedy step whose top-1/top-2 logit margin is below this may flip under fp32 rounding
N_GREEDY = 16
PROMPTS = random_prompts(3, seed=7, lengths=(8, 40))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_hf(path, attn: str = "sdpa") -> NormSwapForCausalLM:
    return NormSwapForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@torch.no_grad()
def prompt_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(token_t | tokens_<t), t >= 1, from one sequence's logits [T, V] (what vLLM's prompt_logprobs gives)."""
    return logits[:-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@torch.no_grad()
def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    return prompt_logprobs(model(torch.tensor([ids])).logits[0], ids)


def max_diff(got, want) -> float:
    return max(float((torch.as_tensor(g) - torch.as_tensor(w)).abs().max()) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def round_trips(checkpoints, tmp_path_factory):
    """option -> the test checkpoint loaded by the HF class and written back with save_pretrained (fp32), plus the
    tokenizer files a server needs (save_pretrained writes the model only)."""
    root = tmp_path_factory.mktemp("hf_saved")
    out = {}
    for option, src in checkpoints.items():
        out[option] = root / option
        load_hf(src).save_pretrained(out[option])
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, out[option] / name)
    return out


@pytest.fixture(scope="module")
def vllm_fp32(checkpoints, round_trips):
    """(option, "original" | "saved") -> vLLM's prompt logprobs and greedy tokens, float32, eager."""
    runs = [(option, kind) for option in OPTIONS for kind in ("original", "saved")]
    dirs = {"original": checkpoints, "saved": round_trips}
    results = run_vllm_offline([{"model": str(dirs[kind][option]), "prompts": PROMPTS, "max_tokens": N_GREEDY,
                                 "dtype": "float32", "enforce_eager": True} for option, kind in runs])
    return dict(zip(runs, results))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_logprobs_match_vllm_and_reference(checkpoints, vllm_fp32, option):
    model, ref = load_hf(checkpoints[option]), load_reference(checkpoints[option])
    got = [hf_prompt_logprobs(model, ids) for ids in PROMPTS]
    vs_vllm = max_diff(got, vllm_fp32[(option, "original")]["prompt_logprobs"])
    vs_ref = max_diff(got, [ref.prompt_logprobs(ids) for ids in PROMPTS])
    print(f"{option}: max |HF - vLLM| {vs_vllm:.2e}, max |HF - reference| {vs_ref:.2e} nats")
    assert vs_vllm < TOL and vs_ref < TOL


@pytest.mark.parametrize("option", list(OPTIONS))
def test_zoo_matches_reference(option):
    """The committed zoo checkpoints (bf16 on disk, read as fp32) through the HF class and the reference."""
    path = option_dir(option)
    model, ref = load_hf(path), load_reference(path)
    prompts = random_prompts(2, seed=11, vocab=model.config.vocab_size, lengths=(32, 96))
    diff = max_diff([hf_prompt_logprobs(model, ids) for ids in prompts], [ref.prompt_logprobs(ids) for ids in prompts])
    print(f"zoo {option}: max |HF - reference| {diff:.2e} nats")
    assert diff < TOL


@pytest.mark.parametrize("option", list(OPTIONS))
def test_generate_matches_vllm_greedy(checkpoints, vllm_fp32, option):
    """One generate() call on the prompts as a left-padded batch (positions from the mask, KV cache on)."""
    model = load_hf(checkpoints[option])
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_GREEDY,
                         min_new_tokens=N_GREEDY, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values  # [B, steps, 2]
    margins = top2[..., 0] - top2[..., 1]
    for b, want in enumerate(vllm_fp32[(option, "original")]["greedy"]):
        got = out.sequences[b, width:].tolist()
        first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
        if first is not None:  # identical up to a near-tie, after which the two continuations may part
            assert margins[b, first] < MARGIN, f"prompt {b} step {first}: HF {got}, vLLM {want}"
    print(f"{option}: smallest greedy margin {float(margins.min()):.3f}")


@pytest.mark.parametrize("option", list(OPTIONS))
def test_save_pretrained_is_served_by_vllm(checkpoints, round_trips, vllm_fp32, option):
    config = json.loads((round_trips[option] / "config.json").read_text())
    assert config["model_type"] == "normswap" and config["architectures"] == ["NormSwapForCausalLM"]
    diff = max_diff(vllm_fp32[(option, "saved")]["prompt_logprobs"], vllm_fp32[(option, "original")]["prompt_logprobs"])
    print(f"{option}: vLLM on the saved copy vs the original: max |diff| {diff:.2e} nats")
    assert diff < TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_right_padding_and_loss(checkpoints, option, attn):
    model, ref = load_hf(checkpoints[option], attn), load_reference(checkpoints[option])
    short, long = PROMPTS[0][:12], PROMPTS[1][:30]
    ids = torch.tensor([short + [0] * (len(long) - len(short)), long])
    mask = (torch.arange(len(long)) < torch.tensor([[len(short)], [len(long)]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        alone = model(torch.tensor([short])).logits[0]
    assert float((out.logits[0, :len(short)] - alone).abs().max()) < TOL
    assert max_diff([prompt_logprobs(alone, short)], [ref.prompt_logprobs(short)]) < TOL
    # shifted cross entropy over the real tokens of both rows, from the reference's own logits
    nll = torch.cat([-torch.tensor(ref.prompt_logprobs(seq)) for seq in (short, long)])
    assert abs(float(out.loss) - float(nll.mean())) < TOL


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_converted_checkpoints_match_their_source(kind, tmp_path):
    """`normswap convert` output (tanh GELU, ReLU, RMSNorm without beta, GQA, an untied head) through the HF class
    against the transformers model it was converted from: an independent implementation of the same function."""
    from checkpoints.hf_models import VOCAB, build, hf_logits
    from vllm_normswap.checkpoints.convert import convert
    from vllm_normswap.checkpoints.tokenizer import save_hf_tokenizer

    source = build(kind)
    source.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(shared_tokenizer(), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ns", dtype="float32")
    model = load_hf(tmp_path / "ns")
    for ids in random_prompts(2, seed=5, vocab=VOCAB, lengths=(8, 40)):
        with torch.no_grad():
            got = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        diff = float((got - hf_logits(source, ids).log_softmax(-1)).abs().max())
        print(f"{kind}: max |HF class - source| {diff:.2e} nats")
        assert diff < TOL


def test_auto_classes_load_without_remote_code():
    from transformers import AutoConfig, AutoModelForCausalLM

    path = option_dir("rms-swiglu")
    assert AutoConfig.from_pretrained(path).model_type == "normswap"
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), NormSwapForCausalLM)


# lm-eval's hf backend, in a process of its own: offline, its dataset cache in tmp_path, nothing imported here
LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
import vllm_normswap

vllm_normswap.register_transformers()
model, tasks = sys.argv[1:]
res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model, "dtype": "float32", "backend": "causal"},
                              tasks=["normswap_choice"], task_manager=TaskManager(include_path=tasks),
                              batch_size=4, device="cpu", log_samples=True)
samples = [{"arguments": s["arguments"], "resps": s["resps"]} for s in res["samples"]["normswap_choice"]]
print("RESULT_JSON " + json.dumps({"acc": res["results"]["normswap_choice"]["acc,none"], "samples": samples}))
"""
DOCS = [{"context": "import os\nimport", "choices": ["sys", "banana"], "label": 0},
        {"context": "def main(", "choices": ["self):", "))))"], "label": 0},
        {"context": "for i in", "choices": ["range(10):", "elephant"], "label": 0},
        {"context": "class Foo", "choices": ["(object):", " = = ="], "label": 0}]


def test_lm_eval_hf_backend(tmp_path):
    pytest.importorskip("lm_eval")
    path = option_dir("ln-gelu")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "normswap_choice.yaml").write_text(f"""task: normswap_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(tmp_path / "docs.jsonl"))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run([sys.executable, "-c", LM_EVAL, str(path), str(tmp_path / "tasks")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON "))[12:])

    # the same log-likelihoods from the reference, tokenised as lm-eval does: the continuation's tokens are those
    # of context + continuation after the context's own
    from transformers import AutoTokenizer

    tok, ref = AutoTokenizer.from_pretrained(path), load_reference(path)
    got, want = [], []
    for sample in result["samples"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            n_context = len(tok.encode(context, add_special_tokens=False))
            whole = tok.encode(context + continuation, add_special_tokens=False)
            want.append(sum(ref.prompt_logprobs(whole)[n_context - 1:]))
            got.append(resp[0][0])
    print(f"lm-eval acc {result['acc']}; max |lm-eval - reference| {max_diff(got, want):.2e} nats")
    assert len(got) == 2 * len(DOCS) and max_diff(got, want) < TOL
