"""One trainer, for `normswap zoo build` and `normswap heal`: transformers' ``Trainer`` on the transformers classes
(model/hf_model.py), over token windows read in a fixed order.

What the two share is set up here, once:

- data: [N, ctx + 1] windows (input, shifted target), read in order (``train_sampling_strategy="sequential"``): the
  caller fixes the batch order by ordering the windows, and N processes see the same global batches as one;
- AdamW (betas 0.9, ``beta2``) with decoupled weight decay on matrices only. The Trainer's default exclusion by
  name (biases, ``*layernorm*``, ``model.norm``) leaves exactly the tensors of dim >= 2 of this model;
- the learning rate: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (``lr_at``); a global grad-norm clip;
- Trainer checkpoints to resume from, a progress bar, the per-step log history.

The loss is what differs: ``NextTokenTrainer`` below (the zoo: plain next-token cross entropy, no auxiliary loss,
no outlier suppression, so whatever activation statistics the four options develop are their own) and heal's
distillation trainer (heal.py). Both are a ``WindowTrainer`` with their own ``window_loss``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from vllm_normswap.model.config import NormSwapArch, tensor_shapes
from vllm_normswap.model.hf_config import NormSwapConfig
from vllm_normswap.model.hf_model import NormSwapForCausalLM
from vllm_normswap.model.reference import ReferenceModel


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int  # optimizer steps
    batch_size: int  # windows per step (the global batch: all processes together)
    ctx: int  # input tokens per window
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
    """The learning rate of optimizer step ``step`` (0-based): the first step already learns, at lr / warmup."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class WindowDataset(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


def training_arguments(spec: TrainSpec, output_dir, progress: bool = True, world: int = 1,
                       **more) -> TrainingArguments:
    """The Trainer settings ``spec`` stands for; ``more``: the caller's evaluation, saving and logging settings.
    ``world``: processes (``spec.batch_size`` is split over them)."""
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=spec.steps, learning_rate=spec.lr, weight_decay=spec.weight_decay,
        adam_beta2=spec.beta2, max_grad_norm=spec.grad_clip, per_device_train_batch_size=spec.batch_size // world,
        seed=spec.seed, train_sampling_strategy="sequential", dataloader_drop_last=True, report_to="none",
        disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(), **more)


class WindowTrainer(Trainer):
    """A Trainer over [B, ctx + 1] windows with ``lr_at`` as its schedule; subclasses give ``window_loss``."""

    def __init__(self, *args, spec: TrainSpec, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec

    def window_loss(self, logits: torch.Tensor, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        x, targets = ids[:, :-1], ids[:, 1:]
        out = model(input_ids=x)
        loss = self.window_loss(out.logits, x, targets)
        return (loss, out) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:  # LambdaLR multiplies the peak lr of every parameter group
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: lr_at(step, self.spec) / self.spec.lr)
            self._created_lr_scheduler = True
        return self.lr_scheduler


class NextTokenTrainer(WindowTrainer):
    def window_loss(self, logits, x, targets):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LossBar(ProgressCallback):
    """The progress bar with the last loss on it, instead of a printed line per log row (the zoo logs every step)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


def initial_model(arch: NormSwapArch, seed: int) -> NormSwapForCausalLM:
    """A fp32 NormSwapForCausalLM with the zoo's initial weights, ``ReferenceModel.reset_parameters(seed)``: the
    init the committed zoo was trained from (the class's own ``_init_weights`` draws the same distributions in
    another order)."""
    ref = ReferenceModel(arch)
    ref.reset_parameters(seed=seed)
    model = NormSwapForCausalLM(NormSwapConfig(**arch.to_dict())).float()
    missing, unexpected = model.load_state_dict(ref.state_dict_for_checkpoint(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding: not a tensor of its own
        raise RuntimeError(f"the checkpoint format and NormSwapForCausalLM disagree: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    return model


def train(arch: NormSwapArch, data: torch.Tensor, order: torch.Tensor, spec: TrainSpec,
          checkpoint_dir: Path | None = None, save_steps: int = 50, progress: bool = True,
          callbacks=()) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a fresh model of ``arch`` (``initial_model``) on ``data[order[step]]`` ([steps, batch] indices into
    [N, ctx + 1] windows) with plain next-token cross entropy. With ``checkpoint_dir``, a Trainer checkpoint is
    written there every ``save_steps`` steps, and a rerun resumes from the last one and trains the steps after it
    again (the batch order is fixed, so the result is the uninterrupted run's). Returns the checkpoint tensors (fp32) and a log
    {losses (one per step), seconds and tokens_per_s (of the steps this call trained)}."""
    if order.shape != (spec.steps, spec.batch_size) or data.shape[1] != spec.ctx + 1:
        raise ValueError(f"batch order {tuple(order.shape)} / windows {tuple(data.shape)} do not match {spec}")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(checkpoint_dir) if checkpoint_dir is not None else Path(scratch)
        saving = dict(save_strategy="steps", save_steps=save_steps, save_total_limit=1) if checkpoint_dir else \
            dict(save_strategy="no")
        args = training_arguments(spec, out, progress, logging_steps=1, **saving)
        trainer = NextTokenTrainer(model=initial_model(arch, spec.seed), args=args, spec=spec,
                                   train_dataset=WindowDataset(data[order.reshape(-1)]), callbacks=list(callbacks))
        for quiet in (ProgressCallback, PrinterCallback):  # a line per step is noise: LossBar shows the loss
            trainer.remove_callback(quiet)
        if progress:
            trainer.add_callback(LossBar)
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - t0
    if trainer.state.global_step != spec.steps:
        raise RuntimeError(f"training stopped at step {trainer.state.global_step} of {spec.steps}")
    steps_here = spec.steps - (int(resume.rsplit("-", 1)[1]) if resume else 0)
    log = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "seconds": seconds,
           "tokens_per_s": round(steps_here * spec.batch_size * spec.ctx / seconds, 1) if seconds else None}
    state = trainer.model.state_dict()
    return {name: state[name].detach().float() for name in tensor_shapes(arch)}, log
