"""--cache and the --cache-* flags (step caching)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hyvideo.diffusion.cache import (
    CACHE_POLICIES,
    DEFAULT_MAX_SKIP,
    DEFAULT_RETENTION,
    CacheConfig,
    settings_errors,
)
from hyvideo.diffusion.cache_tables import DEFAULT_THRESHOLDS, load_ratios_file


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Step cache args (skip the DiT blocks on some steps; off by default)")
    group.add_argument("--cache", type=str, default="none", choices=CACHE_POLICIES,
                       help="Step cache: magcache (precomputed ratios, no per-step sync), teacache "
                            "(modulated-input change), fbcache (first-block residual change); none = exact.")
    thresholds = ", ".join(f"{k} {v}" for k, v in DEFAULT_THRESHOLDS.items())
    group.add_argument("--cache-threshold", type=float, default=None,
                       help=f"Reuse threshold, higher = more reuse (defaults: {thresholds}); 0 = never "
                            "reuse.")
    group.add_argument("--cache-max-skip", type=int, default=None, metavar="K",
                       help=f"magcache: at most K consecutive reused steps (default {DEFAULT_MAX_SKIP}).")
    group.add_argument("--cache-retention", type=float, default=None,
                       help=f"magcache: this fraction of the first steps always computes (default "
                            f"{DEFAULT_RETENTION}).")
    group.add_argument("--cache-calibrate", type=str, nargs="?", const="", default=None, metavar="FILE",
                       help="Compute every step and log MagCache's magnitude ratios for this size and step "
                            "count (and write them as JSON to FILE, for --cache-ratios).")
    group.add_argument("--cache-ratios", type=str, default=None, metavar="FILE",
                       help="magcache: calibrated ratios (JSON from --cache-calibrate FILE) instead of the "
                            "nearest published table.")


def cache_flag_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the --cache* flags (the ratios file itself is read in `cache_config_from_args`)."""
    errors = []
    if args.cache == "none" and args.cache_calibrate is None:
        given = [f for f in ("cache_threshold", "cache_max_skip", "cache_retention")
                 if getattr(args, f) is not None]
        if given:
            errors.append(f"--{given[0].replace('_', '-')} has no effect without --cache magcache, teacache "
                          "or fbcache")
    if args.cache != "magcache":
        given = [f for f in ("cache_max_skip", "cache_retention") if getattr(args, f) is not None]
        if given and args.cache != "none":
            errors.append(f"--{given[0].replace('_', '-')} applies to --cache magcache only")
    if args.cache_calibrate and not Path(args.cache_calibrate).resolve().parent.is_dir():
        errors.append(f"--cache-calibrate {args.cache_calibrate}: its folder does not exist")
    if args.cache_calibrate is not None and args.cache_ratios is not None:
        errors.append("--cache-calibrate measures new ratios: drop --cache-ratios")
    return errors + settings_errors(_cache_settings(args))


def _cache_settings(args: argparse.Namespace, ratios: tuple[float, ...] | None = None) -> CacheConfig:
    return CacheConfig(
        policy=args.cache, threshold=args.cache_threshold,
        max_skip=DEFAULT_MAX_SKIP if args.cache_max_skip is None else args.cache_max_skip,
        retention=DEFAULT_RETENTION if args.cache_retention is None else args.cache_retention,
        calibrate=args.cache_calibrate is not None, calibrate_path=args.cache_calibrate or None,
        ratios=ratios if ratios is not None else (() if args.cache_ratios is not None else None),
        ratios_source=args.cache_ratios,
    )


def cache_config_from_args(args: argparse.Namespace) -> CacheConfig:
    """The step-cache settings; reads --cache-ratios (ValueError, one line, when it is not usable)."""
    ratios = load_ratios_file(args.cache_ratios) if args.cache_ratios is not None else None
    return _cache_settings(args, ratios)
