"""Published constants of the step caches (shared/reference/step_caches.md) and the ratio tables' rules.

Facts carried over from the public reference implementations: TeaCache's polynomial for HunyuanVideo and
MagCache's calibrated per-step magnitude ratios (50 steps, index 0 first) at 720p and 544p.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_THRESHOLDS = {"magcache": 0.24, "teacache": 0.15, "fbcache": 0.06}

# TeaCache: rescaling polynomial of the rel-L1 signal, highest power first.
TEACACHE_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

MAGCACHE_RATIOS_720P = (
    1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101, 1.00679,
    1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161,
    1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226,
    0.98965, 1.01588, 1.02146, 1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513,
    0.97656, 0.90943, 0.85703, 0.75456,
)
MAGCACHE_RATIOS_544P = (
    1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974, 1.00984,
    1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992,
    1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999,
    0.99063, 1.01186, 1.0217, 0.99947, 1.01711, 0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315,
    0.97728, 0.91154, 0.86139, 0.76592,
)
# name -> ((height, width) it was calibrated at, 50 ratios)
MAGCACHE_TABLES = {"720p": ((720, 1280), MAGCACHE_RATIOS_720P), "544p": ((544, 960), MAGCACHE_RATIOS_544P)}


def nearest_magcache_table(height: int, width: int) -> str:
    """The published table whose calibration size has the pixel count closest to height x width."""
    pixels = height * width
    return min(MAGCACHE_TABLES, key=lambda name: abs(math.prod(MAGCACHE_TABLES[name][0]) - pixels))


def nearest_ratios(table: tuple[float, ...], num_steps: int) -> tuple[float, ...]:
    """Map a ratio table to `num_steps` steps by nearest index: step j takes table[round(j * scale)].

    scale = (len(table) - 1) / (num_steps - 1), rounding half to even as the reference's numpy.round; one
    step takes the last ratio.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return (table[-1],)
    scale = (len(table) - 1) / (num_steps - 1)
    return tuple(table[round(j * scale)] for j in range(num_steps))


def load_ratios_file(path: str | Path) -> tuple[float, ...]:
    """MagCache ratios from a JSON file: a list of numbers, or an object with a "mag_ratios" list.

    Raises:
        ValueError: (one line) when the file is missing, unreadable, or holds no list of positive numbers.
    """
    flag = f"--cache-ratios {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc})") from None
    values = data.get("mag_ratios") if isinstance(data, dict) else data
    if not isinstance(values, list) or not values:
        raise ValueError(f"{flag}: expected a JSON list of ratios or {{\"mag_ratios\": [...]}} "
                         "(as written by --cache-calibrate FILE)")
    good = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in values)
    if not good:
        raise ValueError(f"{flag}: every ratio must be a finite number > 0")
    return tuple(float(v) for v in values)
