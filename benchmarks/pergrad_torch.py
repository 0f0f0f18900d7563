"""The PyTorch side of the per-example gradient benchmark (benchmarks/pergrad.sh).

Loads a base model and one LoRA adapter of it from a ledgerflow store (our safetensors and PEFT
files), and computes projected per-example gradients the way PyTorch users do it:
`torch.func.vmap(torch.func.grad(loss))` over a batch of windows, with respect to the adapter's
A and B matrices, then a dense random ±1/√k projection of the flattened gradients (TRAK's
projection; the same kind and size as ours). Prints gradients/s.

    python benchmarks/pergrad_torch.py BASE_DIR ADAPTER_DIR LENGTHS THREADS [K] [BATCH] [DEVICE]

DEVICE is `cpu` (the default) or `cuda`.

LENGTHS has one window length per line: the lengths of the windows our side computes (each
training contribution's first `seq_len` + 1 tokens). The windows are grouped by length and
batched as ours are, filled with seeded random tokens of the base's vocabulary (the cost of a
gradient does not depend on the tokens). Sizes other than those in the weights (heads, rotary
base, norm epsilon) are our defaults.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from torch_model import forward, load_safetensors, rotary_tables


def main():
    base_dir, adapter_dir = sys.argv[1], sys.argv[2]
    lengths = [int(line) for line in open(sys.argv[3]) if line.strip()]
    threads = int(sys.argv[4])
    k = int(sys.argv[5]) if len(sys.argv) > 5 else 512
    batch = int(sys.argv[6]) if len(sys.argv) > 6 else 32
    device = torch.device(sys.argv[7] if len(sys.argv) > 7 else "cpu")
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    w = {n: t.to(device) for n, t in load_safetensors(os.path.join(base_dir, "model.safetensors")).items()}
    vocab, d = w["model.embed_tokens.weight"].shape
    layers = 1 + max(int(n.split(".")[2]) for n in w if n.startswith("model.layers."))
    cfg = {"d_model": d, "n_layers": layers, "n_heads": 4, "vocab_size": vocab,
           "max_seq_len": 256, "rope_theta": 10000.0, "norm_eps": 1e-5}
    tables = tuple(t.to(device) for t in rotary_tables(cfg))
    lora = load_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora = {n: t.to(device) for n, t in lora.items()}
    conf = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    scale = conf["lora_alpha"] / conf["r"]
    names = sorted(lora)
    params = sum(lora[n].numel() for n in names)
    projection = ((torch.randint(0, 2, (params, k)).float() * 2 - 1) / k**0.5).to(device)

    def loss(lora_params, tokens):
        t = tokens[None, :]
        logits = forward(cfg, w, tables, t[:, :-1], lora=lora_params, scale=scale, sdpa=False)
        return F.cross_entropy(logits.reshape(-1, vocab), t[:, 1:].reshape(-1))

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    batches = []
    for length in sorted(set(lengths)):
        count = lengths.count(length)
        for s in range(0, count, batch):
            batches.append(torch.randint(0, vocab, (min(batch, count - s), length)).to(device))
    examples = len(lengths)
    out = []
    # One warm-up batch (not timed): our side's first batch also builds its projector.
    per_example(lora, batches[-1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for windows in batches:
        g = per_example(lora, windows)
        flat = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)
        out.append(flat @ projection)
    sync()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "examples": examples, "tokens": sum(lengths) - examples, "seconds": seconds,
        "per_second": examples / seconds,
        "parameters": params, "k": k, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": str(device),
    }))


if __name__ == "__main__":
    main()
