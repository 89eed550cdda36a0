"""HunyuanVideo's diffusion transformer: double-stream blocks, single-stream blocks, and the full model.

Module attribute names are those of the original, because they are the checkpoint's key names
(see official_dit_state_dict_keys.tsv).
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import DiTConfig
from ..diffusion.cache import BlockStack, StepCache
from ..lowmem.chunking import (
    TokenBuffers,
    check_chunk_setting,
    dense_weight,
    linear_part,
    map_token_chunks,
    resolve_chunk_tokens,
    token_ranges,
)
from ..parallel.dit import ImageTokenSplit
from ..parallel.groups import SequenceParallelState
from .attention import AttentionBackend, attention, resolve_attention_backend
from .embed_layers import PatchEmbed, TimestepEmbedder
from .mlp_layers import MLP, FinalLayer, MLPEmbedder, get_activation_layer
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
from .posemb_layers import apply_rotary_emb, get_rotary_pos_embed
from .token_refiner import SingleTokenRefiner

logger = logging.getLogger(__name__)

# Submodules (top-level names) never stored below the model precision: the input embedders, the token refiner
# and the final layer. Parity: the original's fp8 mode converts exactly the nn.Linear layers outside these
# (the 320 linears of double_blocks / single_blocks), so this is also the fp8 exclusion list. Inside blocks,
# LayerNorm/RMSNorm compute in float32 by construction (norm_layers.py); final_layer.linear is even stored in
# float32 (see FinalLayer).
HIGH_PRECISION_MODULES: tuple[str, ...] = (
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
)


def is_high_precision_module(name: str) -> bool:
    """Whether the submodule called `name` (as in `named_modules()`) belongs to HIGH_PRECISION_MODULES."""
    return name.split(".", 1)[0] in HIGH_PRECISION_MODULES


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


def unpatchify(
    x: torch.Tensor, grid_thw: tuple[int, int, int], patch_size: tuple[int, int, int]
) -> torch.Tensor:
    """(B, T'*H'*W', C*pt*ph*pw) -> (B, C, T'*pt, H'*ph, W'*pw); features ordered (c, pt, ph), pw fastest."""
    (t, h, w), (pt, ph, pw) = grid_thw, patch_size
    x = x.unflatten(-1, (-1, pt, ph, pw)).unflatten(1, (t, h, w))  # (B, t, h, w, C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, t, pt, h, ph, w, pw)
    return x.reshape(x.shape[0], x.shape[1], t * pt, h * ph, w * pw)


@functools.lru_cache(maxsize=4)
def _cached_rope(
    latent_thw: tuple[int, int, int], rope_dims: tuple[int, ...], theta: float, patch: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    # Parity: built on the CPU like the original's tables (a GPU cos/sin can differ in the last bit).
    return get_rotary_pos_embed(latent_thw, rope_dims, theta, patch)


def prepare_text_inputs(
    text_states: torch.Tensor, text_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the text mask and drop padding shared by the whole batch.

    Args:
        text_states: (B, L_txt, C_txt).
        text_mask: (B, L_txt), right padded (ones then zeros), or None for "all valid".
    Returns:
        (text_states, mask): when every sample has the same number n of valid tokens, the states cropped to
        (B, n, C_txt) and mask None (exact: valid tokens never see padding); otherwise the states unchanged
        and the mask as bool (B, L_txt).
    """
    if text_mask is None:
        return text_states, None
    batch, length = text_states.shape[:2]
    if tuple(text_mask.shape) != (batch, length):
        raise ValueError(
            f"text_mask has shape {tuple(text_mask.shape)}, expected (B, L_txt) = {(batch, length)}"
        )
    mask = text_mask.to(text_states.device).bool()
    lengths = mask.sum(dim=1)
    right_padded = torch.arange(length, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, right_padded):
        raise ValueError(
            "text_mask must be right padded: per row, ones (valid tokens) followed only by zeros"
        )
    counts = lengths.tolist()
    if min(counts) == 0:
        raise ValueError("every prompt needs at least one valid text token (a text_mask row is all zeros)")
    if min(counts) == max(counts):
        return text_states[:, : counts[0]], None
    return text_states, mask


class HYVideoDiffusionTransformer(nn.Module):
    """HunyuanVideo's DiT: token refiner, 20 double-stream and 40 single-stream blocks, 3-D RoPE."""

    def __init__(
        self,
        config: DiTConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attention_backend: str = "auto",
        parallel: SequenceParallelState | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        d = config.hidden_size
        self.config = config
        self.patch_size = tuple(config.patch_size)
        self.attention_backend = resolve_attention_backend(attention_backend)
        self.parallel: SequenceParallelState | None = None
        self.enable_sequence_parallel(parallel)

        self.img_in = PatchEmbed(self.patch_size, config.in_channels, d, **factory)
        self.txt_in = SingleTokenRefiner(
            config.text_states_dim, d, config.heads_num, config.refiner_depth, qkv_bias=True, **factory
        )
        self.time_in = TimestepEmbedder(d, nn.SiLU, **factory)
        self.vector_in = MLPEmbedder(config.text_states_dim_2, d, **factory)
        self.guidance_in = TimestepEmbedder(d, nn.SiLU, **factory) if config.guidance_embed else None
        self.double_blocks = nn.ModuleList(
            MMDoubleStreamBlock(config, **factory) for _ in range(config.mm_double_blocks_depth)
        )
        self.single_blocks = nn.ModuleList(
            MMSingleStreamBlock(config, **factory) for _ in range(config.mm_single_blocks_depth)
        )
        self.final_layer = FinalLayer(d, self.patch_size, config.out_channels, nn.SiLU, **factory)

    def set_chunk_tokens(self, setting: int | None) -> None:
        """Token chunking of the blocks and the final layer: None automatic, 0 off, N tokens per chunk.

        Same maths either way (hyvideo/lowmem/chunking.py); a sequence that fits one chunk runs unchunked.
        """
        check_chunk_setting(setting)
        for module in (*self.double_blocks, *self.single_blocks, self.final_layer):
            module.chunk_tokens = setting

    def set_attention_backend(self, name: str) -> None:
        """Switch the attention backend (resolved and validated like the constructor argument)."""
        self.attention_backend = resolve_attention_backend(name)

    def enable_sequence_parallel(self, state: SequenceParallelState | None) -> None:
        """Split the image tokens over the ranks of `state` in every forward (None: run unsplit).

        Every rank must hold the same weights and call forward with the same inputs; each then returns
        the full prediction. Attention runs as Ulysses x ring over the ranks (hyvideo/parallel), with
        its own kernels in place of `attention_backend` (the token refiner keeps `attention_backend`).

        Raises:
            ValueError: when the Ulysses degree does not divide the number of heads.
        """
        if state is not None:
            state.check_num_heads(self.config.heads_num)
        self.parallel = state if state is not None and state.enabled else None

    def _conditioning(
        self, t: torch.Tensor, text_states_2: torch.Tensor, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        vec = self.time_in(t) + self.vector_in(text_states_2)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "this DiT has a guidance embedding (guidance_embed=True, e.g. HYVideo-T/2-cfgdistill): "
                    "pass guidance = embedded guidance scale * 1000, shape (B,)"
                )
            vec = vec + self.guidance_in(guidance.expand(t.shape[0]))
        return vec

    def _token_replace_vec(self, t: torch.Tensor, text_states_2: torch.Tensor) -> torch.Tensor:
        """time_in(0) + vector_in(pooled CLIP): the first frame is conditioned as already clean.

        Parity: no guidance term, also when the model has guidance_in (HunyuanVideo-I2V models.py).
        """
        return self.time_in(torch.zeros_like(t)) + self.vector_in(text_states_2)

    def _token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
        latent_thw = tuple(x.shape[2:])
        if any(n % p for n, p in zip(latent_thw, self.patch_size, strict=True)):
            raise ValueError(
                f"latent (T, H, W) = {latent_thw} must be divisible by the patch size {self.patch_size}"
            )
        return tuple(n // p for n, p in zip(latent_thw, self.patch_size, strict=True))

    def _rope(
        self, latent_thw: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        cos, sin = _cached_rope(latent_thw, tuple(cfg.rope_dim_list), float(cfg.rope_theta), self.patch_size)
        return cos.to(device), sin.to(device)

    def _run_blocks(
        self,
        streams: list[torch.Tensor],
        start: int = 0,
        stop: int | None = None,
        *,
        vec: torch.Tensor,
        freqs: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        backend: AttentionBackend,
        token_replace: TokenReplace | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks start .. stop-1 of [double blocks | single blocks]; returns (img, txt) after them.

        `streams` = [img (B, L_loc, D), txt (B, L_txt, D)] is emptied: when the caller keeps no other
        reference, each hidden state is freed as soon as the next replaces it. The step cache runs the first
        double block alone this way.
        """
        img, txt = streams
        streams.clear()
        num_double = len(self.double_blocks)
        stop = num_double + len(self.single_blocks) if stop is None else stop
        # Double-stream blocks: separate image and text streams
        for block in itertools.islice(self.double_blocks, start, min(stop, num_double)):
            img, txt = block(img, txt, vec, freqs, key_mask=key_mask, backend=backend,
                             token_replace=token_replace)
        if stop <= num_double:
            return img, txt
        # Single-stream blocks over [img | txt]
        img_len = img.shape[1]
        x_tokens = torch.cat((img, txt), dim=1)  # (B, L_loc + L_txt, D)
        del img, txt  # one hidden state less during the single-stream blocks
        for block in itertools.islice(self.single_blocks, max(start - num_double, 0), stop - num_double):
            x_tokens = block(x_tokens, vec, freqs, img_len=img_len, key_mask=key_mask, backend=backend,
                             token_replace=token_replace)
        return x_tokens[:, :img_len], x_tokens[:, img_len:]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_states_2: torch.Tensor,
        guidance: torch.Tensor | None = None,
        *,
        freqs_cos: torch.Tensor | None = None,
        freqs_sin: torch.Tensor | None = None,
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: (B, C_in, T, H, W) latents; T, H, W divisible by the patch size (1, 2, 2).
            t: (B,) or scalar timesteps in [0, 1000].
            text_states: (B, L_txt, text_states_dim) LLM hidden states.
            text_mask: (B, L_txt) right-padded text mask (1 = valid), or None if all tokens are valid.
            text_states_2: (B, text_states_dim_2) CLIP pooled output.
            guidance: (B,) embedded guidance scale * 1000; required iff config.guidance_embed.
            freqs_cos, freqs_sin: optional (L_img, head_dim) float32 RoPE tables; computed from x when None.
            step_cache: this video's StepCache (hyvideo/diffusion/cache.py), created by the pipeline; it
                decides whether this step runs the blocks. None: every block runs.
        Returns:
            (B, C_out, T, H, W). Under sequence parallelism (`enable_sequence_parallel`) every rank passes
            the same full inputs and gets the same full output.
        """
        batch, latent_thw, grid = x.shape[0], tuple(x.shape[2:]), self._token_grid(x)  # grid (T', H', W')
        t = t.expand(batch) if t.ndim == 0 else t
        if (freqs_cos is None) != (freqs_sin is None):
            raise ValueError("pass both freqs_cos and freqs_sin, or neither")

        # 1. Conditioning vector: time_in(t) + vector_in(pooled CLIP) [+ guidance_in(guidance)]
        vec = self._conditioning(t, text_states_2, guidance)  # (B, D)
        # 2. RoPE tables for the image tokens
        if freqs_cos is None:
            freqs_cos, freqs_sin = self._rope(latent_thw, x.device)  # (L_img, D_h) each
        freqs = (freqs_cos.to(x.device), freqs_sin.to(x.device))
        # 3. Image tokens, t-major then h then w; under sequence parallelism this rank's chunk of them
        #    (L_loc = ceil(L_img / P), zero-padded) with the matching RoPE rows; L_loc = L_img in one process.
        img = self.img_in(x)  # (B, L_img, D)
        split = ImageTokenSplit.create(self.parallel, img.shape[1], self.attention_backend)
        img, freqs = split.scatter(img, freqs)  # (B, L_loc, D), 2 x (L_loc, D_h)
        img_len, backend = img.shape[1], split.backend
        # 3b. I2V token replace: this rank's tokens of latent frame 0 get a second vector (t = 0, no guidance)
        token_replace = None
        if self.config.image_condition_type == "token_replace":
            first_frame = split.local_prefix(grid[1] * grid[2])  # frame-0 tokens held by this rank
            token_replace = TokenReplace(self._token_replace_vec(t, text_states_2), first_frame)
        # 4. Text tokens (replicated on every rank): crop padding common to the batch, else keep a mask;
        #    then refine
        text_states, text_mask = prepare_text_inputs(text_states, text_mask)  # (B, L_txt, C_txt)
        txt = self.txt_in(text_states, t, text_mask, backend=self.attention_backend)  # (B, L_txt, D)
        # 5. Key mask over [img | txt]: image and valid text keys (None when no padding is left)
        key_mask = None
        if text_mask is not None:
            img_valid = torch.ones(batch, img_len, dtype=torch.bool, device=text_mask.device)
            key_mask = torch.cat((img_valid, text_mask), dim=1)[:, None, None, :]  # (B, 1, 1, L_loc + L_txt)
        # 6-7. Double-stream blocks, then single-stream blocks over [img | txt] -> image tokens (B, L_loc, D).
        #      Step cache hook: on a step it reuses, no block runs and it adds its stored residual instead.
        run_blocks = functools.partial(self._run_blocks, vec=vec, freqs=freqs, key_mask=key_mask,
                                       backend=backend, token_replace=token_replace)
        if step_cache is None:
            streams = [img, txt]
            del img, txt  # the blocks hold the only references: the block input is freed after block 0
            img, _ = run_blocks(streams)
        else:
            def run_cached(img, txt, start=0, stop=None):  # the cache keeps its own references anyway
                return run_blocks([img, txt], start, stop)

            blocks = BlockStack.create(run_cached, self.double_blocks[0], split, img_len)
            img = step_cache.run(blocks, img, txt, vec)
        # 8. Final layer on the image tokens (per token, so before the gather: C_out * 4 features travel
        #    instead of D), gather every rank's tokens, unpatchify
        out = self.final_layer(img, vec)  # (B, L_loc, C_out * pt * ph * pw)
        out = split.gather(out)  # (B, L_img, C_out * pt * ph * pw)
        return unpatchify(out, grid, self.patch_size)  # (B, C_out, T, H, W)
