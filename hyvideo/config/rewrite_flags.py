"""--prompt-rewrite and the --rewrite-* flags."""

from __future__ import annotations

import argparse
import os

from hyvideo.prompt_rewrite import API_KEY_ENV_VARS, REWRITE_MODES, RewriteConfig


def _add_rewrite_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Prompt rewrite args (see README.md, 'Prompt rewrite')")
    group.add_argument("--prompt-rewrite", type=str, default=None, choices=REWRITE_MODES,
                       help="Rewrite each prompt before encoding, as the paper does: normal (clean English "
                            "caption) or master (adds visual and aesthetic detail). Default: off.")
    group.add_argument("--rewrite-endpoint", type=str, default=None, metavar="URL",
                       help="OpenAI-compatible server (e.g. http://localhost:8000/v1) to rewrite with; API "
                            f"key from ${API_KEY_ENV_VARS[0]} or ${API_KEY_ENV_VARS[1]}. Default: the "
                            "loaded LLM text encoder.")
    group.add_argument("--rewrite-model", type=str, default=None, metavar="NAME",
                       help="Model name the --rewrite-endpoint server serves.")
    group.add_argument("--rewrite-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="Seconds to wait for the rewrite server per try (default 60).")
    group.add_argument("--rewrite-retries", type=int, default=2,
                       help="Extra tries (1 s, 2 s, 4 s ... apart) when the server is unreachable, times out "
                            "or answers 429/5xx (default 2).")
    group.add_argument("--rewrite-max-tokens", type=int, default=None,
                       help="Longest rewrite in tokens (default: the server's limit; 256 with the local "
                            "LLM).")
    group.add_argument("--rewrite-fallback", action="store_true",
                       help="If rewriting fails, warn and continue with the original prompt (default: "
                            "exit 2).")


def rewrite_validation_errors(args: argparse.Namespace) -> list[str]:
    """Problems with the --prompt-rewrite / --rewrite-* flags."""
    errors = []
    if args.prompt_rewrite is None:
        given = [name for name in ("rewrite_endpoint", "rewrite_model", "rewrite_max_tokens")
                 if getattr(args, name) is not None] + (["rewrite_fallback"] if args.rewrite_fallback else [])
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            errors.append(f"{flags} need --prompt-rewrite normal or --prompt-rewrite master")
        return errors
    endpoint = args.rewrite_endpoint
    if endpoint is not None and not endpoint.strip().lower().startswith(("http://", "https://")):
        errors.append(f"--rewrite-endpoint must be an http:// or https:// URL, got {endpoint!r}")
    if endpoint is not None and not (args.rewrite_model or "").strip():
        errors.append("--rewrite-endpoint needs --rewrite-model NAME (the model the server serves)")
    if endpoint is None and args.rewrite_model is not None:
        errors.append("--rewrite-model needs --rewrite-endpoint URL (without one the loaded LLM rewrites)")
    if not args.rewrite_timeout > 0:
        errors.append(f"--rewrite-timeout must be > 0 seconds, got {args.rewrite_timeout}")
    if args.rewrite_retries < 0:
        errors.append(f"--rewrite-retries must be >= 0, got {args.rewrite_retries}")
    if args.rewrite_max_tokens is not None and args.rewrite_max_tokens < 1:
        errors.append(f"--rewrite-max-tokens must be >= 1, got {args.rewrite_max_tokens}")
    return errors


def rewrite_config_from_args(args: argparse.Namespace) -> RewriteConfig:
    """The rewrite settings (mode None: off); the API key comes from the environment only, never a flag."""
    key_env = next((name for name in API_KEY_ENV_VARS if os.environ.get(name, "").strip()), None)
    return RewriteConfig(
        mode=args.prompt_rewrite, endpoint=args.rewrite_endpoint.strip() if args.rewrite_endpoint else None,
        model=args.rewrite_model.strip() if args.rewrite_model else None, timeout_s=args.rewrite_timeout,
        retries=args.rewrite_retries, max_tokens=args.rewrite_max_tokens, fallback=args.rewrite_fallback,
        api_key_env=key_env if args.rewrite_endpoint else None,
        api_key=os.environ[key_env].strip() if key_env and args.rewrite_endpoint else None,
    )
