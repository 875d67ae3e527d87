"""A GPT: the decoder-only transformer language model of `model.name: gpt` (registered in models.py).

    model = GPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    logits = model(tokens)              # tokens: LongTensor (B, T <= block_size) -> (B, T, vocab_size)

The shape is nanoGPT's (Karpathy), written here in our own words: a token embedding plus a learned position
embedding, ``n_layer`` pre-norm blocks, a final LayerNorm and a head that shares its weight with the token
embedding. A block is x + attention(LN(x)), then x + MLP(LN(x)); attention has ONE fused qkv Linear and
one output Linear, the MLP is Linear(d, 4d) -> GELU -> Linear(4d, d). Init as nanoGPT's: every weight
normal(0, 0.02), the two residual projections of each block (attention's output and the MLP's second
Linear) scaled by 1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth, biases
zero.

N:M sparsity sees the Linear layers of the blocks (qkv, proj, fc1, fc2): those are the GEMMs. The token
embedding is a table lookup, not a GEMM, and it is the model's first layer; the tied head is its last
(experiments/layers.py describes the embedding to the first/last rule, so every block Linear is sparse and
embedding and head stay dense). The position embedding is a bare parameter (``pos``, not an
nn.Embedding): it is no layer, and `nmtrain prune`, which prunes 2-D ``*.weight`` tensors of a
state_dict, leaves it alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which token t sees tokens 0..t only: one fused qkv Linear, one output Linear."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))

    @staticmethod
    def matmul_macs(output: torch.Tensor) -> int:
        """MACs per sample of the two activation products, Q K^T and A V (2 t^2 d), counted dense by
        experiments/flops.py as for the ViT. The causal mask would let a kernel skip half, which the
        sparse methods do not touch; counting them whole keeps dense and sparse runs on one scale."""
        _, t, d = output.shape
        return 2 * t * t * d


class MLP(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.fc2 = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, a head tied to the token embedding."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} must be a multiple of n_head {n_head}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Parameter(torch.zeros(block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight      # tied: one matrix reads tokens in and scores them out
        self._init(n_layer)

    @torch.no_grad()
    def _init(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos, mean=0.0, std=0.02)
        for block in self.blocks:
            for residual in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(residual.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"a window of {t} tokens is longer than the model's block_size {self.block_size}")
        x = self.drop(self.wte(tokens) + self.pos[:t])
        return self.head(self.ln_f(self.blocks(x)))
