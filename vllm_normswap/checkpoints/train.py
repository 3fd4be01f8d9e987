"""Train one zoo model: the pure-torch reference model, AdamW, warmup + cosine, bf16 autocast on CPU.

Plain next-token training and nothing else: no auxiliary losses, no outlier suppression, no re-centering, so
whatever activation statistics the four architectures develop (mean shifts, outlier features) are their own.
Resumable: the full training state is written atomically to ``state_path`` every ``save_every_s`` seconds, and a
rerun continues from the last save (the batch order is a pure function of the seed, so resuming is exact up to
the steps lost since the last save).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_normswap.model.config import NormSwapArch
from vllm_normswap.model.reference import ReferenceModel


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int  # optimizer steps
    batch_size: int  # windows per step
    ctx: int  # tokens per window (the model's context)
    lr: float = 2e-3  # peak learning rate
    warmup: int = 30  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # decoupled decay on matrices only (not norms, biases)
    beta2: float = 0.95  # AdamW second-moment decay (short runs: react quickly)
    grad_clip: float = 1.0  # global grad-norm clip
    seed: int = 0  # init seed (the data order has its own, shared by all options)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.ctx


def lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: ReferenceModel, spec: TrainSpec) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, spec.beta2))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(arch: NormSwapArch, data: torch.Tensor, order: torch.Tensor, spec: TrainSpec,
          state_path: Path | None = None, desc: str = "train", save_every_s: float = 60.0,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train on ``data[order[step]]`` ([steps, batch] indices into [N, ctx + 1] windows). Returns the checkpoint
    tensors (fp32) and a log {losses (one per step), seconds, tokens_per_s}."""
    from tqdm import tqdm

    if order.shape != (spec.steps, spec.batch_size) or data.shape[1] != spec.ctx + 1:
        raise ValueError(f"batch order {tuple(order.shape)} / windows {tuple(data.shape)} do not match {spec}")
    torch.manual_seed(spec.seed)
    model = ReferenceModel(arch)
    model.reset_parameters(seed=spec.seed)
    opt = _optimizer(model, spec)
    start, log = 0, {"losses": [], "seconds": 0.0}
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)  # tensors, numbers, lists: no pickle code runs
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, log = state["step"], state["log"]
    model.train()
    bar = tqdm(total=spec.steps, initial=start, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    t0, last_save = time.perf_counter(), time.perf_counter()
    done_before = log["seconds"]
    for step in range(start, spec.steps):
        batch = data[order[step]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        logits = model(batch[:, :-1])  # fp32: bf16 autocast is ~12x slower on CPUs without AVX512-BF16 / AMX
        loss = F.cross_entropy(logits.float().view(-1, arch.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        log["losses"].append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log["seconds"] = done_before + time.perf_counter() - t0
        if state_path is not None and time.perf_counter() - last_save > save_every_s and step + 1 < spec.steps:
            _save_atomic({"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1, "log": log},
                         state_path)
            last_save = time.perf_counter()
    bar.close()
    log["tokens_per_s"] = round(spec.tokens / log["seconds"], 1) if log["seconds"] else None
    return model.state_dict_for_checkpoint(), log
