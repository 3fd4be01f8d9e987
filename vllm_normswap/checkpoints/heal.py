"""`normswap heal STUDENT --teacher SRC DST`: distil a swapped checkpoint (``normswap swap``) back to the model it
was made from, on the transformers classes (model/hf_model.py) through transformers' ``Trainer``: the trainer
`normswap zoo build` uses too (train.py), with distillation as its loss.

The loss per token, averaged over the batch's tokens (Hinton et al. 2015, "Distilling the knowledge in a neural
network": soft targets at temperature 1, the hard-label term at a much lower weight):

    loss = kl_weight * KL(p_teacher || p_student) + lm_weight * CE(p_student, next token)    (defaults 1.0, 0.01)

A swapped student starts close to its teacher, so the hard-label weight and the learning rate are low (1e-5):
at 0.1 or 1e-4 the student drifts towards the corpus and its KL to the teacher rises (docs/swap-and-heal.md).
The teacher runs in eval mode without gradients. Data: the corpus's training split in a seeded order, cut into
windows of ctx + 1 tokens (input, shifted target), read in that order (``train_sampling_strategy="sequential"``),
so a run on N processes sees the same global batches as a run on one. One process on CPU for the zoo;
``accelerate launch --multi_gpu --num_processes N -m vllm_normswap.cli heal ...`` for several (DDP: NCCL on GPUs,
gloo on a CPU-only machine, where accelerate's ``--cpu`` would start one process; ``torchrun --nproc_per_node N -m
vllm_normswap.cli heal ...`` does the same). The Trainer and accelerate do the distribution, FSDP through
accelerate's config.

Every ``--eval-steps`` steps: KL to the teacher and perplexity of student and teacher on held-out windows (each
process scores a strided share, the sums are reduced), a Trainer checkpoint under DST/checkpoints/, and
DST/heal_log.csv + heal_log.json. It stops at the token budget, or when the held-out KL has not reached a new low
for ``--patience`` evaluations (transformers' EarlyStoppingCallback); the best checkpoint (lowest KL) is the one
written to DST, with heal.json and heal.png (the curves). A rerun of the same command resumes from the last
checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_normswap.model.checkpoint_format import CheckpointError

DATA_SEED = 1234
LOG_FIELDS = ("step", "tokens", "loss", "train_kl", "train_ce", "eval_kl", "eval_ppl", "eval_teacher_ppl",
              "eval_ppl_vs_teacher_pct", "learning_rate")


@dataclass(frozen=True)
class HealSpec:
    tokens: int = 600_000  # token budget: training stops after this many input tokens (all processes together)
    batch_size: int = 8  # windows per optimizer step, all processes together (the global batch)
    ctx: int = 256  # input tokens per window (capped at the model's context)
    lr: float = 1e-5  # peak learning rate (AdamW), linear warmup then cosine decay
    warmup_steps: int = 10
    kl_weight: float = 1.0  # weight of KL(teacher || student)
    lm_weight: float = 0.01  # weight of the next-token cross entropy
    eval_steps: int = 25  # steps between held-out evaluations (and checkpoints)
    eval_windows: int = 64  # held-out windows scored per evaluation
    patience: int = 3  # evaluations without a new lowest KL before stopping
    logging_steps: int = 5  # steps between training-loss log rows
    seed: int = 0


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over tokens of KL(teacher || student), the student's and the teacher's next-token NLL (nats)."""
    s, t = student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum()
    flat = targets.reshape(-1)
    nll_student = F.cross_entropy(s.reshape(-1, s.shape[-1]), flat, reduction="sum")
    nll_teacher = F.cross_entropy(t.reshape(-1, t.shape[-1]), flat, reduction="sum")
    return kl, nll_student, nll_teacher


def _classes(dst: Path, ctx: int, batch_size: int):
    """The distillation variant of the shared trainer (train.py) and the log-file callback, built on first use
    (transformers' Trainer imports accelerate, which the CLI's other commands do not need)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import EvalLoopOutput

    from vllm_normswap.checkpoints.train import WindowTrainer

    class DistillTrainer(WindowTrainer):
        def __init__(self, *args, teacher, heal_spec: HealSpec, heldout: torch.Tensor, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.heal_spec, self.heldout = teacher.eval().requires_grad_(False), heal_spec, heldout
            self._train_sums = torch.zeros(3)  # kl, ce, batches since the last log row (this process)

        def window_loss(self, logits, x, targets):
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=x).logits
            kl, nll, _ = distill_terms(logits, teacher_logits, targets)
            n = targets.numel()
            self._train_sums += torch.tensor([float(kl.detach()) / n, float(nll.detach()) / n, 1.0])
            return self.heal_spec.kl_weight * kl / n + self.heal_spec.lm_weight * nll / n

        def log(self, logs, start_time=None):
            if "loss" in logs:  # a training row: add the two terms, averaged over processes and batches
                sums = self.accelerator.reduce(self._train_sums.to(self.args.device), reduction="sum").cpu()
                self._train_sums.zero_()
                if sums[2] > 0:
                    logs["train_kl"], logs["train_ce"] = float(sums[0] / sums[2]), float(sums[1] / sums[2])
            super().log(logs, start_time)

        @torch.no_grad()
        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            """Held-out KL and perplexities: each process scores windows rank, rank + world, ...; sums reduced."""
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            sums = torch.zeros(4, dtype=torch.float64)  # kl, nll student, nll teacher, tokens
            mine = self.heldout[self.args.process_index::self.args.world_size]
            for start in range(0, mine.shape[0], self.args.per_device_eval_batch_size):
                ids = mine[start:start + self.args.per_device_eval_batch_size].to(self.args.device)
                x, targets = ids[:, :-1], ids[:, 1:]
                terms = distill_terms(model(input_ids=x).logits, self.teacher(input_ids=x).logits, targets)
                sums += torch.tensor([float(t) for t in terms] + [targets.numel()], dtype=torch.float64)
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
            model.train(was_training)
            kl, nll, nll_teacher, n = (float(v) for v in sums)
            ppl, teacher_ppl = math.exp(nll / n), math.exp(nll_teacher / n)
            p = metric_key_prefix
            metrics = {f"{p}_kl": kl / n, f"{p}_ppl": ppl, f"{p}_teacher_ppl": teacher_ppl,
                       f"{p}_ppl_vs_teacher_pct": 100.0 * (ppl / teacher_ppl - 1), f"{p}_tokens": int(n)}
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                                  num_samples=self.heldout.shape[0])

    class LogFiles(TrainerCallback):
        """DST/heal_log.csv and .json after every evaluation (main process), so a long run can be watched."""

        def on_evaluate(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_log(state.log_history, dst, ctx, batch_size)

    return DistillTrainer, LogFiles


def prepare_data(student: Path, corpus_path, spec: HealSpec, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, ctx + 1] training windows (enough for the token budget, in a seeded order; repeated if the corpus is
    smaller) and [M, ctx + 1] held-out windows (up to 2 from the start of every held-out document, as the zoo's
    evaluation takes them, the first --eval-windows of a seeded order)."""
    from tokenizers import Tokenizer

    from vllm_normswap.checkpoints.corpus import load_corpus
    from vllm_normswap.checkpoints.dataset import encode_stream, shuffled_docs, spread_windows, windows

    path = student / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: `normswap heal` tokenizes the corpus with the student's "
                              "tokenizer.json (the teacher must share it)")
    tok = Tokenizer.from_file(str(path))
    corpus = load_corpus(corpus_path)
    need = spec.tokens + spec.batch_size * (ctx + 1)
    train = windows(encode_stream(tok, shuffled_docs(corpus.train, DATA_SEED), need), ctx)
    steps = max_steps(spec, ctx)
    if train.shape[0] < steps * spec.batch_size:  # a small corpus: several epochs, each in its own seeded order
        order = torch.cat([torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(DATA_SEED + k))
                           for k in range(-(-steps * spec.batch_size // train.shape[0]))])
        train = train[order]
    heldout = spread_windows(tok, shuffled_docs(corpus.heldout, DATA_SEED), ctx)
    return train, heldout[:spec.eval_windows]


def max_steps(spec: HealSpec, ctx: int) -> int:
    return max(1, math.ceil(spec.tokens / (spec.batch_size * ctx)))


def _check(student: Path, teacher: Path, dst: Path) -> int:
    """Bad input named with its fix; returns the context length both models allow."""
    from vllm_normswap.checkpoints.files import load_arch

    a, b = load_arch(student), load_arch(teacher)
    if a.vocab_size != b.vocab_size:
        raise CheckpointError(f"student {student} has vocab_size {a.vocab_size}, teacher {teacher} has "
                              f"{b.vocab_size}: distillation compares their next-token distributions token by "
                              "token, so they need the same tokenizer (make the student with `normswap swap` from "
                              "the teacher)")
    if (dst / "heal.json").is_file():
        raise CheckpointError(f"{dst} holds a finished heal (heal.json); pass another DST or remove it")
    if dst.exists() and not (dst / "checkpoints").is_dir():
        raise CheckpointError(f"{dst} exists and is not an unfinished heal (no checkpoints/ in it); pass another "
                              "DST or remove it")
    return min(a.max_position_embeddings, b.max_position_embeddings)


def write_log(history: list[dict], dst: Path, ctx: int, batch_size: int) -> list[dict]:
    """Trainer's log history as one row per step (training and evaluation merged), CSV and JSON."""
    rows: dict[int, dict] = {}
    for entry in history:
        row = rows.setdefault(entry["step"], {"step": entry["step"], "tokens": entry["step"] * batch_size * ctx})
        row.update({k: v for k, v in entry.items() if k in LOG_FIELDS})
    ordered = [rows[s] for s in sorted(rows)]
    with open(dst / "heal_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(ordered)
    (dst / "heal_log.json").write_text(json.dumps(ordered, indent=1) + "\n")
    return ordered


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if "eval_kl" in r]
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    tokens = [r["tokens"] / 1e6 for r in ev]
    ax_kl.plot(tokens, [r["eval_kl"] for r in ev], "o-", label="held-out")
    tr = [r for r in rows if "train_kl" in r]
    ax_kl.plot([r["tokens"] / 1e6 for r in tr], [r["train_kl"] for r in tr], alpha=0.5, label="training batches")
    ax_kl.set(xlabel="tokens (M)", ylabel="KL(teacher || student), nats/token", yscale="log", title="KL to teacher")
    ax_kl.legend()
    ax_ppl.plot(tokens, [r["eval_ppl"] for r in ev], "o-", label="student")
    ax_ppl.plot(tokens, [r["eval_teacher_ppl"] for r in ev], "--", label="teacher")
    ax_ppl.set(xlabel="tokens (M)", ylabel="held-out perplexity", title="perplexity")
    ax_ppl.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heal(student, teacher, dst, corpus=None, spec: HealSpec = HealSpec(), progress: bool = True,
         callbacks=()) -> dict:
    """Run (or resume) the distillation; returns the summary (on the main process; {} on the others).
    ``callbacks``: more transformers TrainerCallbacks."""
    import os

    from transformers import EarlyStoppingCallback
    from transformers.trainer_utils import get_last_checkpoint

    from vllm_normswap.checkpoints.train import TrainSpec, WindowDataset, training_arguments
    from vllm_normswap.model.hf_model import NormSwapForCausalLM

    student, teacher, dst = Path(student), Path(teacher), Path(dst)
    ctx = min(spec.ctx, _check(student, teacher, dst))  # ctx input positions 0..ctx-1
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    if spec.batch_size % world:
        raise CheckpointError(f"--batch-size {spec.batch_size} is the global batch: it must be a multiple of the "
                              f"{world} processes")
    train, heldout = prepare_data(student, corpus, spec, ctx)
    resume = get_last_checkpoint(str(dst / "checkpoints")) if (dst / "checkpoints").is_dir() else None
    # the shared trainer (train.py) with heal's optimizer: cosine decay to 0, no weight decay, AdamW's default beta2
    train_spec = TrainSpec(steps=max_steps(spec, ctx), batch_size=spec.batch_size, ctx=ctx, lr=spec.lr,
                           warmup=spec.warmup_steps, min_lr_ratio=0.0, weight_decay=0.0, beta2=0.999, seed=spec.seed)
    args = training_arguments(
        train_spec, dst / "checkpoints", progress, world, per_device_eval_batch_size=8, eval_strategy="steps",
        eval_steps=spec.eval_steps, save_strategy="steps", save_steps=spec.eval_steps, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="kl", greater_is_better=False,
        logging_steps=spec.logging_steps, eval_on_start=resume is None)
    if args.world_size != world:
        raise CheckpointError(f"the Trainer sees {args.world_size} processes, WORLD_SIZE says {world}; start several "
                              "processes with `accelerate launch --multi_gpu --num_processes N -m vllm_normswap.cli "
                              "heal ...`")
    model = NormSwapForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = NormSwapForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(args.device)
    trainer_class, log_files = _classes(dst, ctx, spec.batch_size)
    trainer = trainer_class(
        model=model, args=args, train_dataset=WindowDataset(train), eval_dataset=WindowDataset(heldout),
        spec=train_spec, teacher=teacher_model, heal_spec=spec, heldout=heldout,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=spec.patience), log_files(), *callbacks])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)  # eval_on_start: step 0 is the student as swapped
    seconds = time.perf_counter() - t0
    trainer.save_model(str(dst))  # the best checkpoint (lowest held-out KL), loaded at the end of train()
    summary = {}
    if trainer.is_world_process_zero():
        for f in student.iterdir():  # the tokenizer the student was healed with
            if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
                shutil.copy2(f, dst / f.name)
        rows = write_log(trainer.state.log_history, dst, ctx, spec.batch_size)
        start = next(r for r in rows if "eval_kl" in r)
        steps = trainer.state.global_step
        best_step = trainer.state.best_global_step or steps
        final = next(r for r in rows if r["step"] == best_step and "eval_kl" in r)
        if start["eval_kl"] <= final["eval_kl"]:  # no evaluation beat the swapped student: keep it as it was
            best_step, final = 0, start
            for name in ("config.json", "model.safetensors"):
                shutil.copy2(student / name, dst / name)
        summary = {
            "student": str(student), "teacher": str(teacher), "dst": str(dst), "processes": world,
            "steps": steps, "tokens": steps * spec.batch_size * ctx, "seconds_this_run": round(seconds, 1),
            "stopped": "token budget" if steps >= args.max_steps else "KL stopped falling",
            "best_step": best_step, "student_unchanged": best_step == 0,
            "start": {"kl": start["eval_kl"], "ppl": start["eval_ppl"]},
            "healed": {"kl": final["eval_kl"], "ppl": final["eval_ppl"]},
            "teacher_ppl": final["eval_teacher_ppl"], "ppl_vs_teacher_pct": final["eval_ppl_vs_teacher_pct"],
            "eval_tokens": heldout[:, 1:].numel(), "train_loss": result.training_loss,
            "loss": f"{spec.kl_weight} * KL(teacher || student) + {spec.lm_weight} * CE", "spec": asdict(spec)}
        (dst / "heal.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot(rows, dst / "heal.png", f"heal {student.name} -> teacher {teacher.name}")
        shutil.rmtree(dst / "checkpoints", ignore_errors=True)
    return summary


def add_arguments(p) -> None:
    d = HealSpec()
    p.add_argument("student", help="the checkpoint to heal (from `normswap swap`)")
    p.add_argument("dst", help="output directory: the healed checkpoint, heal.json, heal_log.csv/json, heal.png")
    p.add_argument("--teacher", required=True, help="the checkpoint the student was swapped from")
    p.add_argument("--corpus", default=None, help="text files / JSONL ({\"text\": ...} per line), a file or a dir "
                                                  "(None = this Python's standard library, the zoo's corpus)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="token budget (input tokens, all processes)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="windows per optimizer step, all processes together")
    p.add_argument("--ctx", type=int, default=d.ctx, help="tokens per window (capped at the models' context)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of KL(teacher || student)")
    p.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the next-token cross entropy")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="steps between evaluations/checkpoints")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per evaluation")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many evaluations without a new lowest held-out KL")
    p.add_argument("--logging-steps", type=int, default=d.logging_steps, help="steps between training log rows")
    p.add_argument("--seed", type=int, default=d.seed, help="Trainer seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import os

    # the processes on this machine share its cores (accelerate launch starts LOCAL_WORLD_SIZE of them)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    spec = HealSpec(args.tokens, args.batch_size, args.ctx, args.lr, args.warmup_steps, args.kl_weight,
                    args.lm_weight, args.eval_steps, args.eval_windows, args.patience, args.logging_steps, args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log rows; stdout is for the JSON
        summary = heal(args.student, args.teacher, args.dst, args.corpus, spec, not args.no_progress)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under accelerate launch: every rank waits for the main one's files, then leaves the process group. A rank
        # that exits with the group alive can abort in gloo's threads at interpreter exit ("terminate called
        # without an active exception", SIGABRT: one CI run of test_two_processes_match_one, 2026-12-07;
        # pytorch/pytorch#190489). Only after a run that succeeded: a failed rank would block the others here.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if summary:
        print(json.dumps(summary))
    return 0
