"""HunyuanVideo's diffusion transformer: the full model (its blocks are in blocks.py).

Module attribute names are those of the original, because they are the checkpoint's key names
(see official_dit_state_dict_keys.tsv).
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
from torch import nn

from ..constants import DiTConfig
from ..diffusion.cache import BlockStack, StepCache
from ..lowmem.chunking import check_chunk_setting
from ..parallel.dit import ImageTokenSplit
from ..parallel.groups import SequenceParallelState
from .attention import AttentionBackend, resolve_attention_backend
from .blocks import MMDoubleStreamBlock, MMSingleStreamBlock
from .embed_layers import PatchEmbed, TimestepEmbedder
from .mlp_layers import FinalLayer, MLPEmbedder
from .modulate_layers import TokenReplace
from .posemb_layers import get_rotary_pos_embed
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
