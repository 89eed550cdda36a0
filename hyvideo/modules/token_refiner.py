"""The text token refiner (`txt_in`): LLM hidden states -> DiT text tokens."""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .embed_layers import TextProjection, TimestepEmbedder
from .mlp_layers import MLP, get_activation_layer
from .modulate_layers import apply_gate
from .norm_layers import FP32LayerNorm


def pooled_text_context(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the raw text states over valid tokens: x (B, L, C), mask (B, L) | None -> (B, C) float32."""
    if mask is None:
        return x.float().mean(dim=1)
    # Parity: the float mask promotes the sum to float32, as in the original.
    weights = mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


def refiner_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Self-attention mask of the refiner: M[b, 0, i, j] = mask[b, i] AND mask[b, j], column 0 forced True.

    Args:
        mask: (B, L) text mask (any dtype, nonzero = valid).
    Returns:
        (B, 1, L, L) bool. Forcing key 0 keeps the rows of padded queries from being empty (no NaN).
    """
    valid = mask.bool()
    full = valid[:, None, :, None] & valid[:, None, None, :]
    full[:, :, :, 0] = True
    return full


class IndividualTokenRefinerBlock(nn.Module):
    """Pre-LN self-attention + MLP over the text tokens, each gated by the conditioning vector."""

    def __init__(
        self,
        hidden_size: int,
        heads_num: int,
        mlp_width_ratio: float = 4.0,
        act_type: str = "silu",
        qkv_bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        act_layer = get_activation_layer(act_type)
        self.heads_num = heads_num
        self.norm1 = FP32LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, **factory)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias, **factory)
        # The original's self_attn_q_norm / self_attn_k_norm are Identity (qk_norm=False): nothing to hold.
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias, **factory)
        self.norm2 = FP32LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, **factory)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_width_ratio), act_layer, **factory)
        self.adaLN_modulation = nn.Sequential(
            act_layer(), nn.Linear(hidden_size, 2 * hidden_size, bias=True, **factory)
        )

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None, *, backend: str
    ) -> torch.Tensor:
        """x (B, L, D), c (B, D), attn_mask (B, 1, L, L) | None -> (B, L, D)."""
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        qkv = self.self_attn_qkv(self.norm1(x).to(x.dtype))  # (B, L, 3D), layout (K H D)
        q, k, v = qkv.unflatten(-1, (3, self.heads_num, -1)).unbind(2)  # (B, L, H, D_h) each
        x = x + apply_gate(
            self.self_attn_proj(attention(q, k, v, backend=backend, key_mask=attn_mask)), gate_msa
        )
        return x + apply_gate(self.mlp(self.norm2(x).to(x.dtype)), gate_mlp)


class IndividualTokenRefiner(nn.Module):
    """A stack of `IndividualTokenRefinerBlock` sharing one attention mask."""

    def __init__(
        self,
        hidden_size: int,
        heads_num: int,
        depth: int,
        mlp_width_ratio: float = 4.0,
        act_type: str = "silu",
        qkv_bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            IndividualTokenRefinerBlock(
                hidden_size, heads_num, mlp_width_ratio, act_type, qkv_bias, dtype=dtype, device=device
            )
            for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, *, backend: str
    ) -> torch.Tensor:
        attn_mask = None if mask is None else refiner_attention_mask(mask.to(x.device))
        for block in self.blocks:
            x = block(x, c, attn_mask, backend=backend)
        return x


class SingleTokenRefiner(nn.Module):
    """Embeds the LLM states and refines them, conditioned on the timestep and the pooled prompt."""

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        heads_num: int,
        depth: int,
        mlp_width_ratio: float = 4.0,
        act_type: str = "silu",
        qkv_bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        act_layer = get_activation_layer(act_type)
        self.input_embedder = nn.Linear(in_channels, hidden_size, bias=True, **factory)
        self.t_embedder = TimestepEmbedder(hidden_size, act_layer, **factory)
        self.c_embedder = TextProjection(in_channels, hidden_size, act_layer, **factory)
        self.individual_token_refiner = IndividualTokenRefiner(
            hidden_size, heads_num, depth, mlp_width_ratio, act_type, qkv_bias, **factory
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, *, backend: str
    ) -> torch.Tensor:
        """Refine text tokens.

        Args:
            x: (B, L_txt, C_txt) raw LLM hidden states.
            t: (B,) timesteps.
            mask: (B, L_txt) text mask, or None when every token is valid.
            backend: resolved attention backend.
        Returns:
            (B, L_txt, D).
        """
        # 1. Conditioning: timestep embedding + projected masked mean of the raw states
        c = self.t_embedder(t) + self.c_embedder(pooled_text_context(x, mask))  # (B, D)
        # 2. Token embedding; the states come from outside the model, so cast them to the weight dtype
        tokens = self.input_embedder(x.to(self.input_embedder.weight.dtype))  # (B, L_txt, D)
        # 3. Refiner blocks
        return self.individual_token_refiner(tokens, c, mask, backend=backend)
