"""An independent PyTorch implementation of Monet written from DESIGN.md section 1, used only by the
tests: it produces the random Hugging Face checkpoints and the logits that monet-jax must reproduce.
Its ``state_dict()`` keys are the Hugging Face keys of DESIGN.md section 3."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        self.hd = c.get("head_dim") or c["hidden_size"] // self.h
        self.theta = c["rope_theta"]
        d = c["hidden_size"]
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, pos, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = pos[:, :, None].float() * inv
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        r = self.h // self.kv  # kv head g serves query heads g*r ... g*r+r-1
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.hd)
        s = s.masked_fill(~mask[:, None], torch.finfo(torch.float32).min)  # finite: no NaN on pad rows
        p = torch.softmax(s, dim=-1).to(v.dtype)
        return self.o_proj((p @ v).transpose(1, 2).reshape(b, t, -1))


class Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H, self.E = c["moe_heads"], c["moe_experts"]
        d = c["hidden_size"]
        self.w1 = nn.Linear(d, self.H * self.E, bias=False)
        self.w2 = nn.Linear(d, self.H * self.E, bias=False)
        self.norm1 = nn.BatchNorm1d(self.H, affine=False)
        self.norm2 = nn.BatchNorm1d(self.H, affine=False)
        self.sigma = NormalDist().inv_cdf(1 - c["moe_topk"] / c["moe_experts"])

    def gate(self, w, norm, x):
        b, t, _ = x.shape
        z = w(x).view(b, t, self.H, self.E).float()
        # BatchNorm1d over channels = heads: flatten (b, t, e) into the batch axis.
        n = norm(z.permute(0, 1, 3, 2).reshape(-1, self.H)).view(b, t, self.E, self.H).permute(0, 1, 3, 2)
        thr = torch.clamp(n.max(-1, keepdim=True).values, max=self.sigma)
        return torch.softmax(torch.where(n >= thr, z, torch.full_like(z, -1e10)), dim=-1)

    def forward(self, x):
        return self.gate(self.w1, self.norm1, x), self.gate(self.w2, self.norm2, x)


def relu2(x):
    return torch.relu(x) ** 2


class VD(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, E, m = c["hidden_size"], c["moe_experts"], c["moe_dim"] // 2
        self.E = E
        self.u1, self.u2 = nn.Linear(d, E * m), nn.Linear(d, E * m)
        self.v11, self.v12 = nn.Linear(E * m, d // 2, bias=False), nn.Linear(E * m, d // 2, bias=False)
        self.v21, self.v22 = nn.Linear(E * m, d // 2, bias=False), nn.Linear(E * m, d // 2, bias=False)
        self.b1, self.b2 = nn.Parameter(torch.zeros(E, d // 2)), nn.Parameter(torch.zeros(E, d // 2))

    def forward(self, x, g1, g2):
        b, t, _ = x.shape
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        x1 = relu2(self.u1(x)).view(b, t, self.E, -1)
        x2 = relu2(self.u2(x)).view(b, t, self.E, -1)
        top = (self.v11(torch.einsum("btim,bthi->btim", x1, g1).flatten(-2))
               + self.v12(torch.einsum("btjm,bthj,bthi->btim", x2, g2, g1).flatten(-2))
               + torch.einsum("bthi,id->btd", g1, self.b1))
        bottom = (self.v21(torch.einsum("btim,bthi,bthj->btjm", x1, g1, g2).flatten(-2))
                  + self.v22(torch.einsum("btjm,bthj->btjm", x2, g2).flatten(-2))
                  + torch.einsum("bthj,jd->btd", g2, self.b2))
        return torch.cat((top, bottom), dim=-1)


class HD(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, E, m = c["hidden_size"], c["moe_experts"], c["moe_dim"]
        self.E = E
        self.u = nn.Linear(d, E * m)
        self.v = nn.Linear(E * m, d, bias=False)
        self.b = nn.Parameter(torch.zeros(E, d))

    def forward(self, x, g1, g2):
        b, t, _ = x.shape
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        h = relu2(self.u(x)).view(b, t, self.E, -1)
        y = torch.einsum("btim,bthi->bthm", h, g1)
        z = torch.einsum("bthm,bthj->btjm", y, g2)
        return self.v(z.flatten(-2)) + torch.einsum("bthj,jd->btd", g2, self.b)


class SwiGLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c, idx):
        super().__init__()
        eps = c["rms_norm_eps"]
        self.input_layernorm = RMSNorm(c["hidden_size"], eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps)
        if c["model_type"] == "llama":
            self.mlp = SwiGLU(c)
        else:
            self.moe = (VD if c["moe_decompose"] == "vertical" else HD)(c)
            if idx % c["moe_groups"] == 0:
                self.router = Router(c)

    def forward(self, x, pos, mask, probs):
        x = x + self.self_attn(self.input_layernorm(x), pos, mask)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):
            return x + self.mlp(h), None
        if hasattr(self, "router"):
            probs = self.router(h)
        return x + self.moe(h, *probs), probs


class Body(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c, i) for i in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class ReferenceMonet(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        self.model = Body(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, ids, attention_mask=None):
        b, t = ids.shape
        pos = torch.arange(t)[None].expand(b, t)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].expand(b, t, t)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        x = self.model.embed_tokens(ids)
        probs, groups = None, []
        for layer in self.model.layers:
            x, new = layer(x, pos, mask, probs)
            if hasattr(layer, "router"):
                groups.append(new)
            probs = new
        return self.lm_head(self.model.norm(x)).float(), groups


def randomize(model: ReferenceMonet, seed: int = 0) -> ReferenceMonet:
    """Random weights everywhere, non-zero expert biases and non-trivial BatchNorm running stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.02 if "embed" in name or "lm_head" in name else 0.15
            if name.endswith((".b", ".b1", ".b2")) or name.endswith("bias"):
                std = 0.05
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    return model
