"""Step caching for the DiT: on some denoising steps skip every block and reuse a stored residual.

Three training-free policies; their published rules, coefficients and calibrated ratios are listed in
shared/reference/step_caches.md (the numbers are carried over, the code is ours):

* ``magcache``: precomputed per-step magnitude ratios of the residual, accumulated into an error estimate.
  Decisions depend on the step index only, so they are planned on the host before sampling: the same on
  every rank, no host sync, nothing for a compiler to trace.
* ``teacache``: the rel-L1 change of the first double block's modulated image input, rescaled by a fitted
  polynomial and accumulated (one host sync per step for the decision).
* ``fbcache``: the first double block always runs; the rel-L1 change of its image residual decides whether
  the others run (one host sync per step).

On a "reuse" step no double or single block runs; the image tokens after them are the tokens entering them
plus the residual stored at the last computed step. The token refiner, the embeddings and the final layer
always run.

Use: the pipeline creates one `StepCache` per call (`StepCache.create`: fresh state for every prompt, seed
and batch), calls `begin_step(i)` before each DiT forward and passes the cache to the DiT (``step_cache=``);
the DiT hands its blocks to `StepCache.run` at its one hook point, after the embeddings and before the
blocks. With real CFG the whole batch (negative and positive) takes one decision per forward. Under
sequence parallelism the signals are sums over this rank's real image tokens, all-reduced, so every rank
takes the same decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hyvideo.diffusion.cache_tables import (
    DEFAULT_THRESHOLDS,
    MAGCACHE_TABLES,
    TEACACHE_COEFFICIENTS,
    nearest_magcache_table,
    nearest_ratios,
)
from hyvideo.parallel.groups import SequenceParallelState

logger = logging.getLogger(__name__)

CACHE_POLICIES = ("none", "magcache", "teacache", "fbcache")
DEFAULT_MAX_SKIP = 6  # MagCache's K: at most this many consecutive reused steps
DEFAULT_RETENTION = 0.2  # MagCache: the first int(retention * steps) steps always compute

# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    """Which step cache runs and with which parameters (`--cache*` flags); the default is off."""

    policy: str = "none"
    threshold: float | None = None  # None: the policy's published default (DEFAULT_THRESHOLDS)
    max_skip: int = DEFAULT_MAX_SKIP
    retention: float = DEFAULT_RETENTION
    calibrate: bool = False  # compute every step and measure MagCache ratios for this size / step count
    calibrate_path: str | None = None  # where --cache-calibrate writes the measured ratios (JSON), if given
    ratios: tuple[float, ...] | None = None  # --cache-ratios: the user's calibrated MagCache ratios
    ratios_source: str | None = None  # the file they came from

    @property
    def enabled(self) -> bool:
        return self.policy != "none" or self.calibrate

    @property
    def effective_threshold(self) -> float:
        return DEFAULT_THRESHOLDS.get(self.policy, 0.0) if self.threshold is None else self.threshold


def settings_errors(config: CacheConfig) -> list[str]:
    """Problems with a CacheConfig, as one-line messages naming the flag."""
    errors = []
    if config.policy not in CACHE_POLICIES:
        errors.append(f"--cache must be one of {', '.join(CACHE_POLICIES)}, got {config.policy!r}")
    if config.threshold is not None and not (math.isfinite(config.threshold) and config.threshold >= 0):
        errors.append(f"--cache-threshold must be a number >= 0, got {config.threshold}")
    if config.max_skip < 0:
        errors.append(f"--cache-max-skip must be >= 0, got {config.max_skip}")
    if not (math.isfinite(config.retention) and 0 <= config.retention <= 1):
        errors.append(f"--cache-retention must be between 0 and 1, got {config.retention}")
    if config.calibrate and config.policy not in ("none", "magcache"):
        errors.append(f"--cache-calibrate measures MagCache ratios: use it with --cache none or magcache, "
                      f"not {config.policy}")
    if config.ratios is not None and config.policy != "magcache":
        errors.append("--cache-ratios holds MagCache ratios: add --cache magcache")
    return errors


# --------------------------------------------------------------------------------------------------
# Policies as pure functions (host floats in, decision and new accumulator out)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagCacheAccumulator:
    """MagCache's running estimate since the last computed step."""

    ratio: float = 1.0  # product of the per-step magnitude ratios
    error: float = 0.0  # sum of |1 - ratio| over the reused steps
    steps: int = 0  # consecutive steps accumulated


def magcache_step(
    acc: MagCacheAccumulator, ratio: float, *, step: int, num_steps: int, threshold: float, max_skip: int,
    retention: float, has_residual: bool = True,
) -> tuple[bool, MagCacheAccumulator]:
    """(reuse, accumulator after step `step`) by MagCache's rule.

    Steps before int(retention * num_steps) always compute and leave the accumulator alone. From there the
    ratio is accumulated; the step reuses when the accumulated error is <= threshold and at most `max_skip`
    steps were accumulated, else it computes and the accumulator is reset. Threshold 0 never reuses (a ratio
    of exactly 1.0 would otherwise pass with zero estimated error), and nothing is reused before a residual
    was stored.
    """
    if step < int(retention * num_steps):
        return False, acc
    product = acc.ratio * ratio
    new = MagCacheAccumulator(product, acc.error + abs(1.0 - product), acc.steps + 1)
    if threshold > 0 and has_residual and new.error <= threshold and new.steps <= max_skip:
        return True, new
    return False, MagCacheAccumulator()


def magcache_plan(
    ratios: tuple[float, ...], *, threshold: float, max_skip: int, retention: float
) -> list[tuple[bool, MagCacheAccumulator]]:
    """MagCache's decision and accumulator for every step, from one ratio per step (index 0 first)."""
    acc, plan, computed = MagCacheAccumulator(), [], False
    for step, ratio in enumerate(ratios):
        reuse, acc = magcache_step(acc, ratio, step=step, num_steps=len(ratios), threshold=threshold,
                                   max_skip=max_skip, retention=retention, has_residual=computed)
        computed = computed or not reuse
        plan.append((reuse, acc))
    return plan


def teacache_rescale(rel_l1: float) -> float:
    """TeaCache's fitted polynomial (highest power first), evaluated by Horner's rule."""
    value = 0.0
    for coefficient in TEACACHE_COEFFICIENTS:
        value = value * rel_l1 + coefficient
    return value


def teacache_step(
    acc: float, rel_l1: float | None, *, step: int, num_steps: int, threshold: float
) -> tuple[bool, float]:
    """(reuse, accumulator after step `step`) by TeaCache's rule.

    The first and the last step compute and reset the accumulator; otherwise the rescaled rel-L1 is added
    and the step reuses while the sum is below the threshold, else it computes and resets. `rel_l1` None
    (no previous input) computes.
    """
    if step == 0 or step == num_steps - 1 or rel_l1 is None:
        return False, 0.0
    acc += teacache_rescale(rel_l1)
    if threshold > 0 and acc < threshold:
        return True, acc
    return False, 0.0


def fbcache_step(rel_diff: float | None, *, threshold: float) -> bool:
    """Whether to reuse: the first block's residual changed by less than `threshold` (rel-L1)."""
    return rel_diff is not None and threshold > 0 and rel_diff < threshold


# --------------------------------------------------------------------------------------------------
# Signals (device tensors; sums over real image tokens, all-reduced under sequence parallelism)
# --------------------------------------------------------------------------------------------------


def all_reduce_sums(values: torch.Tensor, parallel: SequenceParallelState | None) -> torch.Tensor:
    """Sum `values` over every sequence-parallel rank (a no-op in one process)."""
    if parallel is None or not parallel.enabled:
        return values
    wire = values.to(parallel.comm_device)
    for group in (parallel.ulysses_group, parallel.ring_group):  # the U x R grid, one axis at a time
        if group is not None:
            dist.all_reduce(wire, group=group)
    return wire.to(values.device)


def rel_l1(current: torch.Tensor, previous: torch.Tensor, valid: int,
           parallel: SequenceParallelState | None) -> torch.Tensor:
    """mean|current - previous| / mean|previous| over the real tokens (dim 1) of every rank; 0-d tensor."""
    cur, prev = current[:, :valid].float(), previous[:, :valid].float()
    sums = torch.stack(((cur - prev).abs().sum(), prev.abs().sum()))
    sums = all_reduce_sums(sums, parallel)  # the token counts of the two means cancel
    return sums[0] / sums[1]


def mean_norm_ratio(current: torch.Tensor, previous: torch.Tensor, valid: int,
                    parallel: SequenceParallelState | None) -> torch.Tensor:
    """Mean over tokens (and batch) of ||current|| / ||previous||, norms over features; 0-d tensor."""
    cur, prev = current[:, :valid].float(), previous[:, :valid].float()
    ratios = cur.norm(dim=-1) / prev.norm(dim=-1)  # (B, valid)
    sums = torch.stack((ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)))
    sums = all_reduce_sums(sums, parallel)
    return sums[0] / sums[1]


def modulated_first_input(first_block: nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """TeaCache's signal: img_norm1(img) * (1 + scale1) + shift1 of the first double block, (B, L, D) fp32.

    Under block offload the block's weights wait on the host between forwards; then its modulation (a
    (B, D) vector in, two out) is evaluated where the weights are, so the decision streams no block.
    """
    mod = first_block.img_mod
    params = list(mod.parameters())
    if params[0].device == vec.device:
        msa, _ = mod(vec)
    else:  # compute in the layer's own dtype there (fp8 weights: the dtype of their bias / scales)
        dtypes = [p.dtype for p in params if p.is_floating_point() and p.dtype.itemsize > 1]
        msa, _ = mod(vec.to(params[0].device, dtypes[0] if dtypes else vec.dtype))
    shift, scale = msa.shift.to(img.device), msa.scale.to(img.device)
    normed = first_block.img_norm1(img)  # float32 (FP32LayerNorm)
    return (normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).float()


# --------------------------------------------------------------------------------------------------
# What the DiT hands over at its hook point
# --------------------------------------------------------------------------------------------------

RunBlocks = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockStack:
    """The DiT's blocks as the step cache sees them: a way to run them, and this rank's token facts.

    `run(img, txt, start=0, stop=None)` runs blocks start .. stop-1 of [double blocks | single blocks] on
    img (B, L_loc, D) and txt (B, L_txt, D) and returns both after them.
    """

    run: RunBlocks
    first_double_block: nn.Module
    valid_tokens: int  # real image tokens in this rank's chunk (they come first; the rest is padding)
    parallel: SequenceParallelState | None

    @classmethod
    def create(cls, run: RunBlocks, first_double_block: nn.Module, split, num_tokens: int) -> BlockStack:
        """From the DiT's ImageTokenSplit (hyvideo/parallel/dit.py) and its local token count."""
        valid = split.shard.local_valid_len if split.shard is not None else num_tokens
        return cls(run, first_double_block, valid, split.state)


# --------------------------------------------------------------------------------------------------
# Per-video state
# --------------------------------------------------------------------------------------------------


class StepCache:
    """One video's step-cache state: the decisions so far, the stored residual and the signal history.

    Create it with `StepCache.create` for every pipeline call; never share one between calls.
    """

    def __init__(self, config: CacheConfig, num_steps: int, *, mag_ratios: tuple[float, ...] | None = None,
                 ratios_source: str | None = None) -> None:
        self.config, self.num_steps = config, num_steps
        self.threshold = config.effective_threshold
        self.ratios_source = ratios_source
        self.step = -1
        self.computed_steps: list[int] = []
        self.signals: list[float | None] = []  # teacache / fbcache: the rel-L1 of every step (None: none)
        self.accumulators: list[float] = []  # teacache: the accumulator after every step
        self._residual: torch.Tensor | None = None  # image tokens after the blocks minus those it adds to
        self._reference: torch.Tensor | None = None  # teacache: last input; fbcache: last computed residual
        self._accumulator = 0.0
        self._measured: list[torch.Tensor] = []  # calibration: magnitude ratios, on the device until the end
        self.plan = None
        if config.policy == "magcache" and not config.calibrate:
            self.plan = magcache_plan(mag_ratios, threshold=self.threshold, max_skip=config.max_skip,
                                      retention=config.retention)

    @classmethod
    def create(
        cls, config: CacheConfig | None, *, num_steps: int, height: int, width: int
    ) -> StepCache | None:
        """The state for one pipeline call; None when caching is off (the DiT then runs as without it)."""
        if config is None or not config.enabled:
            return None
        if config.policy != "magcache" or config.calibrate:
            return cls(config, num_steps)
        if config.ratios is not None:
            table, source = config.ratios, config.ratios_source or "--cache-ratios"
        else:
            name = nearest_magcache_table(height, width)
            table, source = MAGCACHE_TABLES[name][1], f"published {name}"
            if sorted(MAGCACHE_TABLES[name][0]) != sorted((height, width)):
                logger.info("MagCache: no published ratios for %dx%d; using the nearest table (%s). "
                            "To calibrate: run once with --cache-calibrate FILE, then --cache-ratios FILE",
                            height, width, name)
        if len(table) != num_steps:
            logger.info("MagCache: ratios for %d steps mapped to %d steps (nearest)", len(table), num_steps)
        return cls(config, num_steps, mag_ratios=nearest_ratios(table, num_steps), ratios_source=source)

    # -- pipeline side --

    def begin_step(self, index: int) -> None:
        """Called by the pipeline before the DiT forward of denoising step `index` (0-based)."""
        if not 0 <= index < self.num_steps:
            raise ValueError(f"step {index} is outside this video's {self.num_steps} steps")
        self.step = index

    def summary(self) -> dict:
        """What the sidecar records: the policy, its parameters and the steps that ran the blocks."""
        config = self.config
        record = {"policy": config.policy, "num_steps": self.num_steps,
                  "computed_steps": list(self.computed_steps)}
        if config.policy != "none":
            record["threshold"] = self.threshold
        if config.policy == "magcache":
            record.update(max_skip=config.max_skip, retention=config.retention, ratios=self.ratios_source)
        if config.calibrate:
            record["measured_mag_ratios"] = self.measured_ratios()
        return record

    def measured_ratios(self) -> list[float]:
        """Calibration: the magnitude ratio of every step (1.0 for the first), as MagCache's tables."""
        return [1.0] + [float(r) for r in torch.stack(self._measured).tolist()] if self._measured else [1.0]

    def log_summary(self) -> None:
        logger.info("Step cache %s: computed %d of %d steps", self.config.policy, len(self.computed_steps),
                    self.num_steps)
        if self.config.calibrate:
            logger.info("MagCache ratios measured (%d steps): %s", self.num_steps,
                        [round(r, 5) for r in self.measured_ratios()])

    # -- DiT side --

    def run(
        self, blocks: BlockStack, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor
    ) -> torch.Tensor:
        """The image tokens after every block, (B, L_loc, D): computed, or the stored residual added.

        Args:
            blocks: the DiT's blocks (BlockStack). img: (B, L_loc, D) tokens entering the first double block.
            txt: (B, L_txt, D) refined text tokens. vec: (B, D) conditioning vector.
        """
        if self.step < 0:
            raise ValueError("StepCache.begin_step(i) must be called before each DiT forward")
        if self.config.calibrate:
            return self._compute(blocks, img, txt, measure=True)
        if self.config.policy == "fbcache":
            return self._run_fbcache(blocks, img, txt)
        if self.config.policy == "magcache":
            reuse = self.plan[self.step][0]  # planned on the host: no sync, the same on every rank
        else:
            reuse = self._teacache_reuse(blocks, img, vec)
        if reuse:
            return img + self._residual
        return self._compute(blocks, img, txt)

    def _compute(self, blocks: BlockStack, img: torch.Tensor, txt: torch.Tensor, *,
                 measure: bool = False) -> torch.Tensor:
        out, _ = blocks.run(img, txt)
        residual = out - img
        if measure and self._residual is not None:
            ratio = mean_norm_ratio(residual, self._residual, blocks.valid_tokens, blocks.parallel)
            self._measured.append(ratio)
        self._residual = residual
        self.computed_steps.append(self.step)
        return out

    def _teacache_reuse(self, blocks: BlockStack, img: torch.Tensor, vec: torch.Tensor) -> bool:
        modulated = modulated_first_input(blocks.first_double_block, img, vec)
        signal = None
        if self._reference is not None:
            signal = rel_l1(modulated, self._reference, blocks.valid_tokens, blocks.parallel).item()
        self._reference = modulated  # updated on every step, reused or not
        reuse, self._accumulator = teacache_step(self._accumulator, signal, step=self.step,
                                                 num_steps=self.num_steps, threshold=self.threshold)
        self.signals.append(signal)
        self.accumulators.append(self._accumulator)
        return reuse and self._residual is not None

    def _run_fbcache(self, blocks: BlockStack, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img_first, txt_first = blocks.run(img, txt, stop=1)  # the first double block always runs
        first_residual = img_first - img
        signal = None
        if self._reference is not None:
            signal = rel_l1(first_residual, self._reference, blocks.valid_tokens, blocks.parallel).item()
        self.signals.append(signal)
        if fbcache_step(signal, threshold=self.threshold) and self._residual is not None:
            return img_first + self._residual
        out, _ = blocks.run(img_first, txt_first, start=1)
        # The reference residual moves only on computed steps, so slow drift over reused steps adds up.
        self._reference, self._residual = first_residual, out - img_first
        self.computed_steps.append(self.step)
        return out
