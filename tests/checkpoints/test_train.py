"""The one trainer (checkpoints/train.py: transformers' Trainer on NormSwapForCausalLM), which `normswap zoo build`
and `normswap heal` share, against a plain-torch training loop written here, the loop the committed zoo was
trained with: the pure-torch reference model from the same init, the same windows in the same order, AdamW with
decay on matrices only, linear warm-up then cosine decay to min_lr_ratio, and a global grad-norm clip.

Then the resume path: a run interrupted after a checkpoint continues from it and logs what an uninterrupted run
logs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import interrupt_after_save
from vllm_normswap.checkpoints.random_init import make_arch
from vllm_normswap.checkpoints.train import TrainSpec, train
from vllm_normswap.model.reference import ReferenceModel

# a tiny model; the quick zoo's hyper-parameters (lr 3e-3, warm-up, cosine to 0.1, decay 0.1, beta2 0.95, clip 1)
ARCH = make_arch("ln-swiglu", hidden_size=64, layers=2, heads=1, vocab_size=256, max_positions=32, gelu_width=192)
SPEC = TrainSpec(steps=16, batch_size=4, ctx=32, lr=3e-3, warmup=4)
# fp32 throughout; the two models compute attention differently (transformers' sdpa, the reference's explicit
# softmax), so the last bits differ. Measured over the 16 steps: max |delta loss| 4.8e-7, weights 4e-7 relative.
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # tiny matmuls: OpenMP threads only spin on the shared box
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    """Windows of Zipf-distributed token ids (a unigram to learn, so the loss falls) and a seeded batch order over
    them that repeats windows (two epochs), as the zoo's order does for a small corpus."""
    g = torch.Generator().manual_seed(7)
    zipf = 1.0 / torch.arange(1, ARCH.vocab_size + 1, dtype=torch.float64)
    windows = torch.multinomial(zipf, 40 * (SPEC.ctx + 1), replacement=True, generator=g).view(40, SPEC.ctx + 1)
    order = torch.cat([torch.randperm(40, generator=g) for _ in range(2)])[:SPEC.steps * SPEC.batch_size]
    return windows, order.view(SPEC.steps, SPEC.batch_size)


def schedule(step: int) -> float:
    """Warm-up from lr / warmup at the first step, then cosine from lr down to lr * min_lr_ratio at the end."""
    s = SPEC
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / (s.steps - s.warmup)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def plain_loop(windows, order) -> tuple[list[float], list[float], dict]:
    """Per-step losses and (pre-clip) grad norms, and the final weights, of the hand-written loop."""
    model = ReferenceModel(ARCH)
    model.reset_parameters(seed=SPEC.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": SPEC.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=SPEC.lr, betas=(0.9, SPEC.beta2))
    losses, norms = [], []
    for step in range(SPEC.steps):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        batch = windows[order[step]]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, ARCH.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), SPEC.grad_clip)))
        opt.step()
        losses.append(loss.item())
    return losses, norms, model.state_dict_for_checkpoint()


def test_trainer_matches_the_plain_loop(data, tmp_path):
    windows, order = data
    want, norms, weights = plain_loop(windows, order)
    tensors, log = train(ARCH, windows, order, SPEC, progress=False)
    got = log["losses"]
    assert len(got) == SPEC.steps
    diffs = [abs(a - b) for a, b in zip(got, want)]
    print(f"max |loss(Trainer) - loss(plain loop)| over {SPEC.steps} steps: {max(diffs):.2e}; losses "
          f"{want[0]:.3f} -> {want[-1]:.3f}; grad norms {min(norms):.2f}..{max(norms):.2f}")
    assert max(diffs) < TOL, list(zip(got, want))
    assert want[-1] < want[0] - 0.5  # it learned: the comparison is of a real trajectory
    assert max(norms) > SPEC.grad_clip  # the clip acted on some steps, so it is compared too
    # the key bias's gradient is zero in exact arithmetic (it adds q . b_k to a whole row of scores, which softmax
    # ignores), so AdamW's lr * g / |g| turns rounding noise into full steps there, differently in each model
    rel = max(float((tensors[k] - v).norm() / v.norm()) for k, v in weights.items() if "k_proj.bias" not in k)
    print(f"max relative weight difference after {SPEC.steps} steps: {rel:.2e}")
    assert rel < TOL


def test_resumes_from_its_checkpoint(data, tmp_path):
    windows, order = data
    full, full_log = train(ARCH, windows, order, SPEC, checkpoint_dir=tmp_path / "full", save_steps=8,
                           progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(ARCH, windows, order, SPEC, checkpoint_dir=tmp_path / "resumed", save_steps=8, progress=False,
              callbacks=[interrupt_after_save(8)])
    assert (tmp_path / "resumed" / "checkpoint-8").is_dir()
    resumed, resumed_log = train(ARCH, windows, order, SPEC, checkpoint_dir=tmp_path / "resumed", save_steps=8,
                                 progress=False)
    # the first 8 losses come back from the checkpoint's log history, the last 8 were trained by the second call
    assert resumed_log["losses"] == pytest.approx(full_log["losses"], abs=1e-6)
    assert max(float((resumed[k] - v).abs().max()) for k, v in full.items()) < 1e-6
