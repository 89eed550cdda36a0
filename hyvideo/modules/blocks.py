"""HunyuanVideo's transformer blocks: the double-stream (image / text apart) and single-stream blocks.

Module attribute names are those of the original, because they are the checkpoint's key names
(see official_dit_state_dict_keys.tsv). The model that stacks them is in models.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import DiTConfig
from ..lowmem.chunking import (
    TokenBuffers,
    dense_weight,
    linear_part,
    map_token_chunks,
    resolve_chunk_tokens,
    token_ranges,
)
from .attention import AttentionBackend, attention
from .mlp_layers import MLP, get_activation_layer
from .modulate_layers import (
    ModulateDiT,
    ModulationOut,
    TokenReplace,
    apply_gate,
    modulate,
    modulation_rows,
    token_modulations,
)
from .norm_layers import FP32LayerNorm, get_norm_layer
from .posemb_layers import apply_rotary_emb


def _modulated_qkv(
    x: torch.Tensor,
    mod: ModulationOut,
    norm: nn.Module,
    qkv: nn.Linear,
    q_norm: nn.Module,
    k_norm: nn.Module,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, L, D) -> q, k, v (B, L, H, D_h): LayerNorm + modulate in float32, fused projection, q/k norm."""
    x_mod = modulate(norm(x), mod.shift, mod.scale).to(x.dtype)  # float32 island, then the stream dtype
    q, k, v = qkv(x_mod).unflatten(-1, (3, heads, -1)).unbind(2)  # layout (K H D), K outermost
    return q_norm(q).to(v.dtype), k_norm(k).to(v.dtype), v


def _gated_residuals(
    x: torch.Tensor,
    attn: torch.Tensor,
    msa: ModulationOut,
    mlp_mod: ModulationOut,
    proj: nn.Linear,
    norm2: nn.Module,
    mlp: nn.Module,
) -> torch.Tensor:
    """x + gate1 * proj(attn), then + gate2 * mlp(modulate(norm2(x))); x (B, L, D), attn (B, L, D)."""
    x = x + apply_gate(proj(attn), msa.gate)
    return x + apply_gate(mlp(modulate(norm2(x), mlp_mod.shift, mlp_mod.scale).to(x.dtype)), mlp_mod.gate)


class MMDoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over [img | txt]."""

    def __init__(
        self, config: DiTConfig, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        d, d_mlp, act = config.hidden_size, config.mlp_hidden_dim, get_activation_layer(config.mlp_act_type)
        bias = config.qkv_bias
        self.heads_num = config.heads_num
        self.chunk_tokens: int | None = None  # token chunking (hyvideo/lowmem/chunking.py): None = automatic

        self.img_mod = ModulateDiT(d, 6, nn.SiLU, **factory)
        self.img_norm1 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_attn_qkv = nn.Linear(d, 3 * d, bias=bias, **factory)
        self.img_attn_q_norm = self._qk_norm(config, factory)
        self.img_attn_k_norm = self._qk_norm(config, factory)
        self.img_attn_proj = nn.Linear(d, d, bias=bias, **factory)
        self.img_norm2 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_mlp = MLP(d, d_mlp, act, **factory)

        self.txt_mod = ModulateDiT(d, 6, nn.SiLU, **factory)
        self.txt_norm1 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_attn_qkv = nn.Linear(d, 3 * d, bias=bias, **factory)
        self.txt_attn_q_norm = self._qk_norm(config, factory)
        self.txt_attn_k_norm = self._qk_norm(config, factory)
        self.txt_attn_proj = nn.Linear(d, d, bias=bias, **factory)
        self.txt_norm2 = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = MLP(d, d_mlp, act, **factory)

    @staticmethod
    def _qk_norm(config: DiTConfig, factory: dict) -> nn.Module:
        return (
            get_norm_layer(config.qk_norm_type, config.head_dim, **factory)
            if config.qk_norm
            else nn.Identity()
        )

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        freqs: tuple[torch.Tensor, torch.Tensor],
        *,
        key_mask: torch.Tensor | None,
        backend: AttentionBackend,
        token_replace: TokenReplace | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, L_img, D), txt (B, L_txt, D), vec (B, D), freqs 2 x (L_img, D_h) -> updated (img, txt).

        token_replace: I2V; the first-frame image tokens use its vector's modulation (text never does).
        """
        chunk = resolve_chunk_tokens(self.chunk_tokens, img.shape[1])
        if chunk < img.shape[1]:
            return self._forward_chunked(img, txt, vec, freqs, key_mask=key_mask, backend=backend,
                                         chunk=chunk, token_replace=token_replace)
        # 1. Modulation: (shift, scale, gate) for attention and for the MLP, per stream ((B, D), or
        #    (B, L_img, D) for the image stream under token replace)
        img_msa, img_mlp = token_modulations(self.img_mod, vec, token_replace, img.shape[1])
        txt_msa, txt_mlp = self.txt_mod(vec)
        # 2. Per-stream q, k, v (B, L_s, H, D_h); RoPE on the image tokens only
        img_q, img_k, img_v = _modulated_qkv(
            img,
            img_msa,
            self.img_norm1,
            self.img_attn_qkv,
            self.img_attn_q_norm,
            self.img_attn_k_norm,
            self.heads_num,
        )
        img_q, img_k = apply_rotary_emb(img_q, img_k, *freqs)
        txt_q, txt_k, txt_v = _modulated_qkv(
            txt,
            txt_msa,
            self.txt_norm1,
            self.txt_attn_qkv,
            self.txt_attn_q_norm,
            self.txt_attn_k_norm,
            self.heads_num,
        )
        # 3. Joint attention over [img | txt] -> (B, L_img + L_txt, D)
        attn = attention(
            torch.cat((img_q, txt_q), dim=1),
            torch.cat((img_k, txt_k), dim=1),
            torch.cat((img_v, txt_v), dim=1),
            backend=backend,
            key_mask=key_mask,
        )
        img_attn, txt_attn = attn.split((img.shape[1], txt.shape[1]), dim=1)
        # 4. Gated residual attention and MLP, per stream
        img = _gated_residuals(
            img, img_attn, img_msa, img_mlp, self.img_attn_proj, self.img_norm2, self.img_mlp
        )
        txt = _gated_residuals(
            txt, txt_attn, txt_msa, txt_mlp, self.txt_attn_proj, self.txt_norm2, self.txt_mlp
        )
        return img, txt

    def _stream_qkv(self, prefix: str, x: torch.Tensor, mod: ModulationOut):
        return _modulated_qkv(
            x,
            mod,
            getattr(self, f"{prefix}_norm1"),
            getattr(self, f"{prefix}_attn_qkv"),
            getattr(self, f"{prefix}_attn_q_norm"),
            getattr(self, f"{prefix}_attn_k_norm"),
            self.heads_num,
        )

    def _stream_residuals(self, prefix: str, x, attn, msa: ModulationOut, mlp: ModulationOut) -> torch.Tensor:
        proj, norm2 = getattr(self, f"{prefix}_attn_proj"), getattr(self, f"{prefix}_norm2")
        return _gated_residuals(x, attn, msa, mlp, proj, norm2, getattr(self, f"{prefix}_mlp"))

    def _forward_chunked(self, img, txt, vec, freqs, *, key_mask, backend, chunk: int, token_replace=None):
        """`forward` with the image tokens processed `chunk` at a time outside attention (same maths)."""
        img_len, txt_len = img.shape[1], txt.shape[1]
        # 1. Modulation, per stream
        img_msa, img_mlp = token_modulations(self.img_mod, vec, token_replace, img_len)
        txt_msa, txt_mlp = self.txt_mod(vec)
        # 2. q, k, v written chunk by chunk into the joint [img | txt] buffers (B, L_img + L_txt, H, D_h):
        #    no full-size fused qkv output, no separate rotated copies, no concatenation
        qkv = TokenBuffers(img_len + txt_len)
        for tokens in token_ranges(0, img_len, chunk):
            q, k, v = self._stream_qkv("img", img[:, tokens], modulation_rows(img_msa, tokens))
            q, k = apply_rotary_emb(q, k, freqs[0][tokens], freqs[1][tokens])
            qkv.write(tokens, q, k, v)
            del q, k, v  # v views this chunk's fused projection: free it before the next chunk
        qkv.write(slice(img_len, None), *self._stream_qkv("txt", txt, txt_msa))
        # 3. Joint attention -> (B, L_img + L_txt, D); the q/k/v buffers are freed right after
        attn = attention(*qkv.tensors, backend=backend, key_mask=key_mask)
        del qkv
        # 4. Gated residuals per chunk into a new (B, L_img, D) output (the input may still be referenced)
        img_out = map_token_chunks(
            lambda t: self._stream_residuals("img", img[:, t], attn[:, t], modulation_rows(img_msa, t),
                                             modulation_rows(img_mlp, t)),
            token_ranges(0, img_len, chunk),
            img_len,
        )
        txt_out = self._stream_residuals("txt", txt, attn[:, img_len:], txt_msa, txt_mlp)
        return img_out, txt_out


class MMSingleStreamBlock(nn.Module):
    """Shared weights over [img | txt]: attention and MLP computed in parallel from one fused projection."""

    def __init__(
        self, config: DiTConfig, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        d = config.hidden_size
        self.heads_num = config.heads_num
        self.hidden_size = d
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.chunk_tokens: int | None = None  # token chunking (hyvideo/lowmem/chunking.py): None = automatic
        # linear1 rows: [q | k | v | mlp in]; linear2 columns: [attention out | mlp hidden]
        self.linear1 = nn.Linear(d, 3 * d + self.mlp_hidden_dim, bias=True, **factory)
        self.linear2 = nn.Linear(d + self.mlp_hidden_dim, d, bias=True, **factory)
        self.q_norm = MMDoubleStreamBlock._qk_norm(config, factory)
        self.k_norm = MMDoubleStreamBlock._qk_norm(config, factory)
        self.pre_norm = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp_act = get_activation_layer(config.mlp_act_type)()
        self.modulation = ModulateDiT(d, 3, nn.SiLU, **factory)

    def forward(
        self,
        x: torch.Tensor,
        vec: torch.Tensor,
        freqs: tuple[torch.Tensor, torch.Tensor],
        *,
        img_len: int,
        key_mask: torch.Tensor | None,
        backend: AttentionBackend,
        token_replace: TokenReplace | None = None,
    ) -> torch.Tensor:
        """x (B, L_img + L_txt, D) with image tokens first, vec (B, D), freqs 2 x (L_img, D_h) -> x.

        token_replace: I2V; the first-frame image tokens use its vector's modulation.
        """
        chunk = resolve_chunk_tokens(self.chunk_tokens, x.shape[1])
        if chunk < x.shape[1]:
            return self._forward_chunked(x, vec, freqs, img_len=img_len, key_mask=key_mask, backend=backend,
                                         chunk=chunk, token_replace=token_replace)
        # 1. Modulation ((B, D), or (B, L, D) under token replace) and the fused projection:
        #    qkv (B, L, 3D), mlp (B, L, D_mlp)
        (mod,) = token_modulations(self.modulation, vec, token_replace, x.shape[1])
        x_mod = modulate(self.pre_norm(x), mod.shift, mod.scale).to(x.dtype)  # float32 island
        qkv, mlp = self.linear1(x_mod).split((3 * self.hidden_size, self.mlp_hidden_dim), dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads_num, -1)).unbind(2)  # (B, L, H, D_h) each
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        # 2. RoPE on the image tokens only
        img_q, img_k = apply_rotary_emb(q[:, :img_len], k[:, :img_len], *freqs)
        q = torch.cat((img_q, q[:, img_len:]), dim=1)
        k = torch.cat((img_k, k[:, img_len:]), dim=1)
        # 3. Attention (B, L, D), then linear2 over [attention | activated mlp], gated residual
        attn = attention(q, k, v, backend=backend, key_mask=key_mask)
        return x + apply_gate(self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2)), mod.gate)

    def _chunk_x_mod(self, x: torch.Tensor, mod: ModulationOut, tokens: slice) -> torch.Tensor:
        mod = modulation_rows(mod, tokens)
        return modulate(self.pre_norm(x[:, tokens]), mod.shift, mod.scale).to(x.dtype)  # float32 island

    def _chunk_qkv(self, fused: torch.Tensor, freqs, tokens: slice, img_len: int):
        """(B, n, 3D) fused projection of tokens `tokens` -> q, k (normalised, RoPE), v (B, n, H, D_h)."""
        q, k, v = fused.unflatten(-1, (3, self.heads_num, -1)).unbind(2)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if tokens.start < img_len:  # chunks never straddle the image/text boundary (see _forward_chunked)
            q, k = apply_rotary_emb(q, k, freqs[0][tokens], freqs[1][tokens])
        return q, k, v

    def _forward_chunked(self, x, vec, freqs, *, img_len: int, key_mask, backend, chunk: int,
                         token_replace=None) -> torch.Tensor:
        """`forward` with the tokens processed `chunk` at a time outside attention (same maths).

        linear1 is used by row blocks: its q/k/v rows before attention, its MLP rows after it, chunk by chunk
        (the modulated input is recomputed, an elementwise step), and linear2 as attention part + MLP part
        with the split weight. So neither the (B, L, D_mlp) MLP activations nor the [attention | MLP]
        concatenation ever exist at full size, and the output overwrites the attention output in place.
        """
        length, d, lin1 = x.shape[1], self.hidden_size, self.linear1
        ranges = token_ranges(0, img_len, chunk) + token_ranges(img_len, length, chunk)
        weight1, weight2 = dense_weight(lin1), dense_weight(self.linear2)  # None: unknown wrapper
        if weight1 is None or weight2 is None:
            return self._forward_chunked_modules(x, vec, freqs, img_len=img_len, key_mask=key_mask,
                                                 backend=backend, ranges=ranges, token_replace=token_replace)
        qkv_rows, mlp_rows = slice(0, 3 * d), slice(3 * d, None)
        bias1 = (None, None) if lin1.bias is None else (lin1.bias[qkv_rows], lin1.bias[mlp_rows])
        # 1. Modulation; q, k, v chunk by chunk into full-size buffers (B, L, H, D_h)
        (mod,) = token_modulations(self.modulation, vec, token_replace, length)
        qkv = TokenBuffers(length)
        for tokens in ranges:
            fused = F.linear(self._chunk_x_mod(x, mod, tokens), weight1[qkv_rows], bias1[0])  # (B, n, 3D)
            qkv.write(tokens, *self._chunk_qkv(fused, freqs, tokens, img_len))
            del fused
        # 2. Attention (B, L, D); the q/k/v buffers are freed right after
        attn = attention(*qkv.tensors, backend=backend, key_mask=key_mask)
        del qkv

        # 3. Per chunk: MLP rows of linear1, activation, linear2 = attention part + MLP part, gated residual
        def finish(tokens: slice) -> torch.Tensor:
            mlp = self.mlp_act(F.linear(self._chunk_x_mod(x, mod, tokens), weight1[mlp_rows], bias1[1]))
            out = linear_part(attn[:, tokens], weight2, slice(0, d), self.linear2.bias)
            out = out + linear_part(mlp, weight2, slice(d, None))
            return x[:, tokens] + apply_gate(out, modulation_rows(mod, tokens).gate)

        if torch.is_grad_enabled() or attn.dtype != x.dtype:
            return map_token_chunks(finish, ranges, length)
        for tokens in ranges:  # inference: each chunk's output replaces its (used) attention output
            attn[:, tokens] = finish(tokens)
        return attn

    def _forward_chunked_modules(self, x, vec, freqs, *, img_len: int, key_mask, backend, ranges,
                                 token_replace=None):
        """The chunked forward for linear layers we cannot split (e.g. wrapped by an adapter): they are called
        as modules on chunks, and the activated MLP (B, L, D_mlp) is kept across attention."""
        (mod,) = token_modulations(self.modulation, vec, token_replace, x.shape[1])
        qkv, mlp_act = TokenBuffers(x.shape[1]), TokenBuffers(x.shape[1])
        for tokens in ranges:
            # `mlp_in`, not `mlp`: `finish` closes over `mlp`, and `del` of a closure variable is a graph
            # break under torch.compile (DELETE_DEREF)
            fused, mlp_in = self.linear1(self._chunk_x_mod(x, mod, tokens)).split(
                (3 * self.hidden_size, self.mlp_hidden_dim), dim=-1
            )
            qkv.write(tokens, *self._chunk_qkv(fused, freqs, tokens, img_len))
            mlp_act.write(tokens, self.mlp_act(mlp_in))
            del fused, mlp_in
        attn = attention(*qkv.tensors, backend=backend, key_mask=key_mask)
        del qkv
        (mlp,) = mlp_act.tensors

        def finish(tokens: slice) -> torch.Tensor:
            out = self.linear2(torch.cat((attn[:, tokens], mlp[:, tokens]), dim=2))
            return x[:, tokens] + apply_gate(out, modulation_rows(mod, tokens).gate)

        return map_token_chunks(finish, ranges, x.shape[1])
