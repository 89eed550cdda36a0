"""Speed flags (--compile, --fp8-gemm) and memory flags (--dit-chunk-tokens, --vae-tile-*)."""

from __future__ import annotations

import argparse

from hyvideo.modules.compile import COMPILE_MODES

# VAE decode tiles overlap by 25 % of whole latents: 4 x the 884 VAE's 8x spatial / 4x temporal compression.
VAE_TILE_SIZE_MULTIPLE = 32
VAE_TILE_FRAMES_MULTIPLE = 16


def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Speed args (one device)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the DiT's repeated blocks (one compiled graph per block class; "
                            "the first step pays the compile time, a new video size compiles again).")
    group.add_argument("--compile-mode", type=str, default="default", choices=COMPILE_MODES,
                       help="torch.compile mode for --compile.")
    group.add_argument("--fp8-gemm", action="store_true",
                       help="With --use-fp8: multiply in fp8 (torch._scaled_mm, activations quantised per "
                            "token); needs the CPU or a GPU of compute capability >= 8.9. Near-lossless.")


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Memory args (issue 20)")
    group.add_argument("--dit-chunk-tokens", type=int, default=None, metavar="N",
                       help="Run the DiT's per-token work (MLPs, projections, final layer) N tokens at a "
                            "time: same maths, a fraction of the activation memory. Default: automatic "
                            "(chunks of at most 8192 tokens); 0: off.")
    group.add_argument("--vae-tile-size", type=int, default=None, metavar="PX",
                       help="VAE decode tile edge in pixels, a multiple of "
                            f"{VAE_TILE_SIZE_MULTIPLE} (default: the VAE's own, 256). Smaller tiles need "
                            "less memory; tiles overlap by 25 %% and are blended as in the original.")
    group.add_argument("--vae-tile-frames", type=int, default=None, metavar="N",
                       help="VAE decode tile length in frames, a multiple of "
                            f"{VAE_TILE_FRAMES_MULTIPLE} (default: the VAE's own, 64).")


def vae_tile_errors(args: argparse.Namespace) -> list[str]:
    """Problems with --vae-tile-size / --vae-tile-frames, one line each."""
    errors = []
    # A tile must overlap its neighbour by 25 % of whole latents, so its latent length must be a multiple
    # of 4: 4 x the 8x spatial / 4x temporal compression of the 884 VAE.
    for flag, value, multiple, unit, ratio in (
        ("--vae-tile-size", args.vae_tile_size, VAE_TILE_SIZE_MULTIPLE, "px", "8x spatial"),
        ("--vae-tile-frames", args.vae_tile_frames, VAE_TILE_FRAMES_MULTIPLE, "frames", "4x temporal"),
    ):
        if value is not None and (value < multiple or value % multiple):
            errors.append(f"{flag} must be a positive multiple of {multiple} {unit} (4 x the VAE's {ratio} "
                          f"compression, so that tiles overlap by whole latents), got {value}")
        elif value is not None and not args.vae_tiling:
            errors.append(f"{flag} sets the decode tiles: drop --no-vae-tiling")
    return errors


def memory_args_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the memory flags, one line each."""
    errors = []
    if args.dit_chunk_tokens is not None and args.dit_chunk_tokens < 0:
        errors.append(f"--dit-chunk-tokens must be 0 (off) or a positive token count, "
                      f"got {args.dit_chunk_tokens}")
    return errors + vae_tile_errors(args)
