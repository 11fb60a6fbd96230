"""Small torch modules whose state-dict key names follow a re-basin spec, for the exactness
tests: an MLP, a ResNet block with GroupNorm, an attention block with head blocks."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, widths=(6, 12, 10, 4)):
        super().__init__()
        self.net = nn.Sequential(*[m for a, b in zip(widths, widths[1:])
                                   for m in (nn.Linear(a, b), nn.ReLU())][:-1])

    def forward(self, x):
        return self.net(x)


MLP_SPEC = None  # spec="auto" derives it: net.0 -> net.2 -> net.4


class ResBlock(nn.Module):
    """conv -> GroupNorm -> SiLU -> conv -> GroupNorm, plus the skip: the inner channels
    (conv1's outputs, norm1, conv2's inputs) are free inside GroupNorm's groups only."""

    def __init__(self, channels=4, inner=12, groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.nn.functional.silu(self.norm1(self.conv1(x))))


RES_SPEC = {
    "permutations": {"inner": [["conv1.weight", 0], ["conv1.bias", 0], ["norm1.weight", 0],
                               ["norm1.bias", 0], ["conv2.weight", 1]]},
    "constraints": {"inner": {"blocks": 3, "inner": "free"}},
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, then an MLP; residual stream
    unpermuted. Heads move as whole blocks (q and k rows of a head must stay paired); the
    MLP's hidden units are free."""

    def __init__(self, dim=8, heads=2, hidden=16):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(x)))


ATTN_SPEC = {
    "permutations": {
        "heads": [["qkv.weight", 0, 0, 8], ["qkv.bias", 0, 0, 8],
                  ["qkv.weight", 0, 8, 16], ["qkv.bias", 0, 8, 16],
                  ["qkv.weight", 0, 16, 24], ["qkv.bias", 0, 16, 24], ["proj.weight", 1]],
        "mlp": [["fc1.weight", 0], ["fc1.bias", 0], ["fc2.weight", 1]],
    },
    "constraints": {"heads": {"blocks": 2, "inner": "fixed"}},
}
