"""Our decoder-only transformer in PyTorch, for the benchmarks that run PyTorch beside us.

The same computation as `ledgerflow_models::model::Transformer`: token embedding, per layer
RMSNorm → attention (rotary positions, LLaMA's halves convention, causal) → residual, RMSNorm →
SwiGLU MLP → residual; final RMSNorm and an untied head. Weights are looked up by the names our
safetensors files use (`model.layers.0.self_attn.q_proj.weight`, …). With `lora` (PEFT names
`base_model.model.{path}.lora_A.weight` / `lora_B.weight`) each adapted projection adds
`scale · (x·Aᵀ)·Bᵀ`.
"""

import json
import struct

import numpy as np
import torch
import torch.nn.functional as F

PROJECTIONS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]


def load_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", (name, meta["dtype"])
        a, b = meta["data_offsets"]
        buf = np.frombuffer(raw, dtype="<f4", count=(b - a) // 4, offset=8 + n + a)
        out[name] = torch.from_numpy(buf.copy()).reshape(meta["shape"])
    return out


def rotary_tables(cfg):
    hd = cfg["d_model"] // cfg["n_heads"]
    inv = torch.tensor(
        [1.0 / cfg["rope_theta"] ** (2.0 * i / hd) for i in range(hd // 2)], dtype=torch.float32
    )
    pos = torch.arange(cfg["max_seq_len"], dtype=torch.float32)[:, None]
    freqs = pos * inv[None, :]
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def forward(cfg, w, tables, tokens, lora=None, scale=1.0, sdpa=True):
    """Logits `[batch, time, vocab]` of `tokens` `[batch, time]` (int64). `sdpa=False` spells
    the attention out (softmax of masked scores), which `torch.func.vmap` batches; its
    `scaled_dot_product_attention` falls back to a loop under vmap."""
    b, t = tokens.shape
    h, hd = cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
    cos, sin = tables[0][:t].to(tokens.device), tables[1][:t].to(tokens.device)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def proj(x, path):
        y = F.linear(x, w[f"{path}.weight"])
        if lora is not None:
            a = lora.get(f"base_model.model.{path}.lora_A.weight")
            if a is not None:
                bm = lora[f"base_model.model.{path}.lora_B.weight"]
                y = y + scale * F.linear(F.linear(x, a), bm)
        return y

    def norm(x, name):
        return F.rms_norm(x, (x.shape[-1],), w[name], eps=cfg["norm_eps"])

    x = F.embedding(tokens, w["model.embed_tokens.weight"])
    for i in range(cfg["n_layers"]):
        pre = f"model.layers.{i}"
        a = norm(x, f"{pre}.input_layernorm.weight")

        def split(m):
            return proj(a, f"{pre}.self_attn.{m}").view(b, t, h, hd).transpose(1, 2)

        q, k, v = rope(split("q_proj")), rope(split("k_proj")), split("v_proj")
        if sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / hd**0.5
            mask = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
            y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + proj(y.transpose(1, 2).reshape(b, t, -1), f"{pre}.self_attn.o_proj")
        m = norm(x, f"{pre}.post_attention_layernorm.weight")
        g, u = proj(m, f"{pre}.mlp.gate_proj"), proj(m, f"{pre}.mlp.up_proj")
        x = x + proj(F.silu(g) * u, f"{pre}.mlp.down_proj")
    return F.linear(norm(x, "model.norm.weight"), w["lm_head.weight"])
