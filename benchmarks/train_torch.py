"""The PyTorch side of the training benchmark (benchmarks/train.sh).

Reads what `ledgerflow train-reference` wrote to DIR (initial weights, the batches of
every step, settings and learning rates) and trains the same decoder-only transformer (RMSNorm,
rotary positions in LLaMA's halves convention, SwiGLU, untied head) from the same initial weights
on the same batches with the same AdamW, warm-up/cosine schedule and global-norm clipping, in
eager PyTorch with THREADS threads, on the CPU or on DEVICE (`cuda`). Writes DIR/torch.json: the
loss of every step, seconds and tokens/s of the training loop.

    python benchmarks/train_torch.py DIR THREADS [DEVICE]
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from torch_model import forward, load_safetensors, rotary_tables


class Model(torch.nn.Module):
    """The model's weights as parameters, for torch.optim."""

    def __init__(self, cfg, weights):
        super().__init__()
        self.cfg = cfg
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v) for k, v in weights.items()}
        )
        self.tables = rotary_tables(cfg)

    def forward(self, tokens):
        w = {k.replace("__", "."): v for k, v in self.params.items()}
        return forward(self.cfg, w, self.tables, tokens)


def main():
    out, threads = sys.argv[1], int(sys.argv[2])
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
    torch.set_num_threads(threads)
    run = json.load(open(os.path.join(out, "run.json")))
    cfg, tc, lrs = run["model"], run["train"], run["learning_rates"]
    steps, bs, window = tc["steps"], tc["batch_size"], tc["seq_len"] + 1
    batches = np.fromfile(os.path.join(out, "batches.u32"), dtype="<u4")
    batches = torch.from_numpy(batches.astype(np.int64)).view(steps, bs, window).to(device)
    model = Model(cfg, load_safetensors(os.path.join(out, "init.safetensors"))).to(device)
    model.tables = tuple(t.to(device) for t in model.tables)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=tc["weight_decay"]
    )
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        w = batches[step]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Global-norm clipping as ours does it: scale only when the norm is above the clip.
        norm = math.sqrt(float(torch.stack([p.grad.pow(2).sum() for p in params]).sum()))
        if norm > tc["grad_clip"]:
            for p in params:
                p.grad.mul_(tc["grad_clip"] / norm)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.step()
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = steps * bs * tc["seq_len"]
    result = {
        "losses": losses,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    json.dump(result, open(os.path.join(out, "torch.json"), "w"), indent=1)
    print(
        f"torch {torch.__version__}: {steps} steps, {seconds:.2f} s, "
        f"{tokens / seconds:.0f} tokens/s, final loss {losses[-1]:.4f}"
    )


if __name__ == "__main__":
    main()
