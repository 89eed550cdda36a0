"""Safety checks: bounds on sizes, counts and seeds, finite numbers, --no-memory-check."""

from __future__ import annotations

import argparse
import math

# Upper bounds that stop typos (an extra 0) long before they turn into hours of work or a killed process.
# They are generous: the released model was trained up to 720x1280 and 129 frames.
# 4096 px a side: 3.2x the largest trained side; a 4096x4096 image is ~65k tokens, about the 119k of the
# largest trained video. 1025 frames: 8x the trained 129 (257 latent frames); RoPE extends but quality does
# not. 1000 steps: the flow schedule has 1000 training timesteps, more steps only repeat them.
# 64 videos per prompt (--num-videos x --batch-size): a whole grid of seeds in one run.
MAX_VIDEO_SIDE = 4096
MAX_VIDEO_LENGTH = 1025
MAX_INFER_STEPS = 1000
MAX_VIDEOS_PER_PROMPT = 64
# Seeds: torch.Generator takes a 64-bit value; under torchrun rank 0's seed travels as an int64, so every
# seed of a run (--seed ... --seed + videos - 1) must lie in [0, 2**63).
SEED_LIMIT = 2**63


def _add_reliability_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Safety checks")
    group.add_argument("--no-memory-check", action="store_true",
                       help="Start even when the estimated peak memory exceeds what the device has free.")


def reliability_errors(args: argparse.Namespace) -> list[str]:
    """Values no run can use: non-finite numbers, sizes and counts beyond the bounds, seeds out of range."""
    errors = []
    for name in ("cfg_scale", "embedded_cfg_scale", "flow_shift"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):  # --flow-shift None: 7.0 or 17.0 (i2v)
            errors.append(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if len(args.video_size) in (1, 2) and max(args.video_size) > MAX_VIDEO_SIDE:
        errors.append(f"--video-size must be at most {MAX_VIDEO_SIDE} pixels a side (the model was trained "
                      f"up to 720x1280), got {' '.join(map(str, args.video_size))}")
    if args.video_length > MAX_VIDEO_LENGTH:
        errors.append(f"--video-length must be at most {MAX_VIDEO_LENGTH} frames (trained: 129), "
                      f"got {args.video_length}")
    if args.infer_steps > MAX_INFER_STEPS:
        errors.append(f"--infer-steps must be at most {MAX_INFER_STEPS} (the schedule has 1000 timesteps), "
                      f"got {args.infer_steps}")
    videos = args.num_videos * args.batch_size
    if videos > MAX_VIDEOS_PER_PROMPT:
        errors.append(f"--num-videos x --batch-size must be at most {MAX_VIDEOS_PER_PROMPT} videos per "
                      f"prompt, got {args.num_videos} x {args.batch_size}; run several commands instead")
    if args.seed is not None and not 0 <= args.seed <= SEED_LIMIT - max(videos, 1):
        errors.append(f"--seed must be in [0, 2**63 - {max(videos, 1)}] so that the seeds of all "
                      f"{max(videos, 1)} video(s) (seed, seed+1, ...) fit 63 bits, got {args.seed}; omit "
                      "--seed for a random one")
    if not args.save_path.strip():
        errors.append("--save-path is empty: give an output directory (default ./results)")
    return errors
