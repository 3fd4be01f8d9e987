"""`normswap heal` for a few steps on the zoo models (teacher ln-gelu, student ln-swiglu: a real KL to close):

- two processes under `accelerate launch --multi_gpu --num_processes 2` on CPU (DDP over gloo) log the same
  losses and held-out KL as one process on the same global batch;
- a run interrupted after a checkpoint resumes from it and logs what an uninterrupted run logs;
- the written checkpoint is the best one: its perplexity, computed here with the pure-torch reference model on the
  same held-out windows, is the one heal.json reports.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from vllm_normswap.checkpoints import zoo
from vllm_normswap.checkpoints.corpus import load_corpus
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.checkpoints.heal import HealSpec, heal, prepare_data
from utils import get_open_port, interrupt_after_save

TEACHER, STUDENT = zoo.option_dir("ln-gelu"), zoo.option_dir("ln-swiglu")
SPEC = dict(tokens=4 * 32 * 6, batch_size=4, ctx=32, eval_steps=3, eval_windows=8, logging_steps=1, patience=5)
# DDP averages the two halves' gradients in another summation order than one process does: fp32 rounding only
LOSS_TOL = 1e-4
FLAGS = ["--tokens", str(SPEC["tokens"]), "--batch-size", "4", "--ctx", "32", "--eval-steps", "3",
         "--eval-windows", "8", "--logging-steps", "1", "--patience", "5", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small JSONL corpus (one standard-library file a line): its held-out split has a few documents."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    texts = load_corpus().train[::15][:120]
    path.write_text("".join(json.dumps({"text": t[:4000]}) + "\n" for t in texts))
    return path


def _rows(dst):
    return {r["step"]: r for r in json.loads((dst / "heal_log.json").read_text())}


def _heal_cli(args, env_extra=None, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    cmd = [*launcher, "-m", "vllm_normswap.cli", "heal", *args] if launcher else \
        [sys.executable, "-m", "vllm_normswap.cli", "heal", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_processes_match_one(tmp_path, corpus):
    common = [str(STUDENT), "--teacher", str(TEACHER), "--corpus", str(corpus), *FLAGS]
    one = _heal_cli([common[0], str(tmp_path / "one"), *common[1:]])
    # --multi_gpu is accelerate's torchrun launcher: on a machine without GPUs the Trainer (use_cpu) joins the
    # processes over gloo. (accelerate's --cpu starts one process unless given an MPI hostfile.)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(get_open_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    two = _heal_cli([common[0], str(tmp_path / "two"), *common[1:]], launcher=launch)
    assert (one["processes"], two["processes"]) == (1, 2)
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(7))
    print("max |loss(1 process) - loss(2 processes)|:",
          max(abs(a[step]["loss"] - b[step]["loss"]) for step in range(1, 7)))
    for step in range(1, 7):
        assert abs(a[step]["loss"] - b[step]["loss"]) < LOSS_TOL, (step, a[step]["loss"], b[step]["loss"])
    for step in (0, 3, 6):
        assert abs(a[step]["eval_kl"] - b[step]["eval_kl"]) < LOSS_TOL, (step, a[step], b[step])
    assert a[1]["loss"] > 0.01  # a real distance to close, not two zeros agreeing


def test_resumes_from_its_checkpoint(tmp_path, corpus):
    spec = HealSpec(**SPEC)
    full = heal(STUDENT, TEACHER, tmp_path / "full", corpus, spec, progress=False)
    with pytest.raises(KeyboardInterrupt):
        heal(STUDENT, TEACHER, tmp_path / "resumed", corpus, spec, progress=False, callbacks=[interrupt_after_save(3)])
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "heal.json").exists()
    resumed = heal(STUDENT, TEACHER, tmp_path / "resumed", corpus, spec, progress=False)
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "resumed")
    for step in range(1, 7):  # the steps after the checkpoint were trained by the second run
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step]["loss"], b[step]["loss"])
    assert resumed["best_step"] == full["best_step"]
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # removed once the healed model is written

    # the written model is the reported one: perplexity recomputed with the reference model
    _, heldout = prepare_data(STUDENT, corpus, spec, spec.ctx)
    model = load_reference(tmp_path / "resumed")
    with torch.no_grad():
        logits = model(heldout[:, :-1])
    ppl = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), heldout[:, 1:].reshape(-1))))
    assert abs(ppl / resumed["healed"]["ppl"] - 1) < 1e-4, (ppl, resumed["healed"])
    for name in ("heal.png", "heal_log.csv", "tokenizer.json"):
        assert (tmp_path / "resumed" / name).is_file(), name
