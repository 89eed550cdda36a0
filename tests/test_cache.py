"""Step caches (hyvideo/diffusion/cache.py): the published rules by hand, exactness when off, the DiT hook,
signals, calibration, block offload (reused steps stream nothing), flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hyvideo.config import parse_args
from hyvideo.diffusion.cache import (
    CacheConfig,
    MagCacheAccumulator,
    StepCache,
    fbcache_step,
    magcache_plan,
    magcache_step,
    teacache_rescale,
    teacache_step,
)
from hyvideo.diffusion.cache_tables import (
    MAGCACHE_RATIOS_544P,
    MAGCACHE_RATIOS_720P,
    load_ratios_file,
    nearest_magcache_table,
    nearest_ratios,
)
from hyvideo.diffusion.pipelines import TextConditions
from hyvideo.lowmem.offload import enable_block_offload
from hyvideo.modules.modulate_layers import modulate
from tests.parallel_workers import sp_cases as cases

# --------------------------------------------------------------------------------------------------
# MagCache: the published ratios, by hand
# --------------------------------------------------------------------------------------------------


def test_magcache_720p_50_steps_by_hand():
    plan = magcache_plan(MAGCACHE_RATIOS_720P, threshold=0.24, max_skip=6, retention=0.2)
    # int(0.2 * 50) = 10 steps always compute, accumulator untouched.
    assert all(not reuse and acc == MagCacheAccumulator() for reuse, acc in plan[:10])
    # Steps 10..19 by hand: ratio *= r_i, error += |1 - ratio|, steps += 1; reuse while error <= 0.24.
    r = MAGCACHE_RATIOS_720P
    p10 = r[10]
    p11 = p10 * r[11]
    p12 = p11 * r[12]
    p13 = p12 * r[13]
    e13 = (p10 - 1) + (p11 - 1) + (p12 - 1) + (p13 - 1)  # 0.20777 <= 0.24: still reused
    assert e13 == pytest.approx(0.2077708, abs=1e-6)
    p15, p16 = r[15], r[15] * r[16]
    p17 = p16 * r[17]  # error 0.23484 <= 0.24; step 18 would reach 0.37085 and computes
    expected = {
        10: (True, p10, p10 - 1, 1), 11: (True, p11, (p10 - 1) + (p11 - 1), 2),
        12: (True, p12, (p10 - 1) + (p11 - 1) + (p12 - 1), 3), 13: (True, p13, e13, 4),
        14: (False, 1.0, 0.0, 0),  # 0.20777 + |1 - 1.14886| = 0.35663 > 0.24
        15: (True, p15, p15 - 1, 1), 16: (True, p16, (p15 - 1) + (p16 - 1), 2),
        17: (True, p17, (p15 - 1) + (p16 - 1) + (p17 - 1), 3), 18: (False, 1.0, 0.0, 0),
        19: (True, r[19], r[19] - 1, 1),
    }
    for step, (reuse, ratio, error, steps) in expected.items():
        got_reuse, acc = plan[step]
        assert got_reuse == reuse, step
        assert acc.ratio == pytest.approx(ratio, rel=1e-12) and acc.error == pytest.approx(error, abs=1e-12)
        assert acc.steps == steps
    computed = [i for i, (reuse, _) in enumerate(plan) if not reuse]
    assert computed == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 18, 23, 29, 34, 41, 46, 48, 49]
    plan_544 = magcache_plan(MAGCACHE_RATIOS_544P, threshold=0.24, max_skip=6, retention=0.2)
    assert [i for i, (reuse, _) in enumerate(plan_544) if not reuse] == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 18, 23, 29, 34, 41, 46, 48]


def test_magcache_30_steps_nearest_interpolation_by_hand():
    # Step j of 30 takes ratio round(j * 49 / 29) (no ties at 30 steps).
    indices = [0, 2, 3, 5, 7, 8, 10, 12, 14, 15, 17, 19, 20, 22, 24, 25, 27, 29, 30, 32, 34, 35, 37, 39, 41,
               42, 44, 46, 47, 49]
    assert indices == [round(j * 49 / 29) for j in range(30)]
    ratios = nearest_ratios(MAGCACHE_RATIOS_720P, 30)
    assert ratios == tuple(MAGCACHE_RATIOS_720P[i] for i in indices)
    plan = magcache_plan(ratios, threshold=0.24, max_skip=6, retention=0.2)
    # int(0.2 * 30) = 6 forced steps; step 6 takes r[10] = 1.03101 (reuse), step 7 r[12]: 1.03101 * 1.02556
    # = 1.05736 -> error 0.08837 (reuse), step 8 r[14]: 1.13083 -> 0.21920 (reuse), step 9 r[15] -> 0.41153.
    assert [reuse for reuse, _ in plan[6:10]] == [True, True, True, False]
    assert plan[8][1].error == pytest.approx(0.03101 + (1.03101 * 1.02556 - 1) + (1.03101 * 1.02556 * 1.06949
                                                                                  - 1), abs=1e-12)
    assert [i for i, (reuse, _) in enumerate(plan) if not reuse] == [0, 1, 2, 3, 4, 5, 9, 14, 19, 26, 29]
    assert nearest_ratios(MAGCACHE_RATIOS_720P, 1) == (0.75456,)
    assert nearest_ratios(MAGCACHE_RATIOS_720P, 50) == MAGCACHE_RATIOS_720P


def test_magcache_edge_rules():
    ones = (1.0,) * 8
    # Threshold 0 never reuses, even when every ratio is exactly 1 (zero estimated error).
    assert not any(r for r, _ in magcache_plan(ones, threshold=0.0, max_skip=6, retention=0.0))
    # K caps consecutive reuses; retention 0 still computes step 0 (no residual to reuse yet).
    plan = magcache_plan(ones, threshold=1.0, max_skip=2, retention=0.0)
    assert [r for r, _ in plan] == [False, True, True, False, True, True, False, True]
    reuse, acc = magcache_step(MagCacheAccumulator(), 1.5, step=3, num_steps=4, threshold=1.0, max_skip=6,
                               retention=0.5)
    assert reuse and acc == MagCacheAccumulator(1.5, 0.5, 1)
    assert nearest_magcache_table(720, 1280) == nearest_magcache_table(1280, 720) == "720p"
    assert nearest_magcache_table(544, 960) == nearest_magcache_table(480, 848) == "544p"


# --------------------------------------------------------------------------------------------------
# TeaCache and first-block cache: hand-made signals
# --------------------------------------------------------------------------------------------------


def test_teacache_by_hand():
    # Polynomial values by hand: p(0.1) = 0.0733226126 - 0.401131952 + 0.675869174 - 0.3149878 + 0.0961237896
    p01, p03, p005 = 0.1291958242, 0.3425518726, 0.0620383524
    assert teacache_rescale(0.1) == pytest.approx(p01, abs=1e-8)
    assert teacache_rescale(0.3) == pytest.approx(p03, abs=1e-8)
    assert teacache_rescale(0.05) == pytest.approx(p005, abs=1e-8)
    signals, acc, decisions, accs = [None, 0.1, 0.1, 0.3, 0.05, 0.1], 0.0, [], []
    for step, signal in enumerate(signals):
        reuse, acc = teacache_step(acc, signal, step=step, num_steps=6, threshold=0.3)
        decisions.append(reuse)
        accs.append(acc)
    # 0: first step computes; 1, 2: 0.129, 0.258 < 0.3 reuse; 3: 0.601 computes and resets; 4: 0.062
    # reuses; 5: the last step computes.
    assert decisions == [False, True, True, False, True, False]
    assert accs == pytest.approx([0.0, p01, 2 * p01, 0.0, p005, 0.0], abs=1e-9)
    assert teacache_step(0.0, 0.0, step=2, num_steps=6, threshold=0.0) == (False, 0.0)


def test_fbcache_by_hand():
    assert [fbcache_step(s, threshold=0.06) for s in (None, 0.01, 0.07, 0.0599, 0.06)] == [
        False, True, False, True, False]
    assert not fbcache_step(0.0, threshold=0.0)


# --------------------------------------------------------------------------------------------------
# In the pipeline (tiny DiT, CFG batch of 2, 75 image tokens)
# --------------------------------------------------------------------------------------------------

STEPS = 6


@pytest.fixture(scope="module")
def dit():
    return cases.build_dit()


def sample(dit, cache: CacheConfig | None, steps: int = STEPS, **kwargs):
    pipe = cases.build_pipeline(dit, None)
    device = pipe.device
    positive, negative = (
        TextConditions(*(t.to(device) for t in cases.text_conditions(valid, seed).astuple()))
        for valid, seed in (((7,), 21), ((4,), 22)))
    with torch.no_grad():
        return pipe(prompt_conditions=positive, negative_conditions=negative,
                    generator=[torch.Generator().manual_seed(11)], show_progress=False, output_type="latent",
                    cache=cache, **{**cases.PIPE, "num_inference_steps": steps, **kwargs})


class Recorder:
    """Forward hooks: what entered the first double block and the final layer, and block calls."""

    def __init__(self, dit) -> None:
        self.img_in, self.final_in, self.first_in, self.first_out, self.block_calls = [], [], [], [], 0
        blocks = [*dit.double_blocks, *dit.single_blocks]
        self.handles = [
            dit.img_in.register_forward_hook(lambda m, a, o: self.img_in.append(o)),
            dit.final_layer.register_forward_pre_hook(lambda m, a: self.final_in.append(a[0])),
            dit.double_blocks[0].register_forward_pre_hook(lambda m, a: self.first_in.append(a)),
            dit.double_blocks[0].register_forward_hook(lambda m, a, o: self.first_out.append(o[0])),
            *(b.register_forward_pre_hook(lambda m, a: self.count()) for b in blocks),
        ]

    def count(self) -> None:
        self.block_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("policy", ["magcache", "teacache", "fbcache"])
def test_threshold_zero_is_exact(dit, policy):
    expected = sample(dit, None)
    out = sample(dit, CacheConfig(policy, threshold=0.0))
    assert torch.equal(out.latents, expected.latents)
    assert out.step_cache["computed_steps"] == list(range(STEPS)) and expected.step_cache is None
    assert torch.equal(sample(dit, CacheConfig()).latents, expected.latents)  # policy none: no cache at all


def test_reused_step_adds_the_stored_residual_and_runs_no_block(dit):
    rec = Recorder(dit)
    try:
        out = sample(dit, CacheConfig("magcache", threshold=10.0, retention=0.0), steps=3)
    finally:
        rec.remove()
    # Step 0 computes (no residual yet); steps 1, 2 reuse (K = 6, error well below 10).
    assert out.step_cache["computed_steps"] == [0]
    assert rec.block_calls == len(dit.double_blocks) + len(dit.single_blocks)
    residual = rec.final_in[0] - rec.img_in[0]
    for step in (1, 2):
        assert torch.equal(rec.final_in[step], rec.img_in[step] + residual)
    # Calling again starts from fresh state: the same decisions and latents (nothing leaks between calls).
    again = sample(dit, CacheConfig("magcache", threshold=10.0, retention=0.0), steps=3)
    assert again.step_cache == out.step_cache and torch.equal(again.latents, out.latents)


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def keep_caches(monkeypatch) -> list[StepCache]:
    """Every StepCache the pipeline creates, in order."""
    made, create = [], StepCache.create
    monkeypatch.setattr(StepCache, "create", lambda *a, **k: made.append(create(*a, **k)) or made[-1])
    return made


def test_teacache_signal_is_the_modulated_input_change(dit, monkeypatch):
    rec, made = Recorder(dit), keep_caches(monkeypatch)
    try:
        sample(dit, CacheConfig("teacache", threshold=1e-9), steps=3)  # every step computes
        sample(dit, CacheConfig("teacache", threshold=10.0), steps=3)  # step 1 reuses
    finally:
        rec.remove()
    block = dit.double_blocks[0]
    inputs = []
    with torch.no_grad():
        for img, _, vec, *_ in rec.first_in[:3]:
            msa, _ = block.img_mod(vec)
            inputs.append(modulate(block.img_norm1(img), msa.shift, msa.scale))
    cache, reusing = made
    assert cache.signals[0] is None
    # Float32 sums over 2 x 75 x 64 values in another order: agreement to ~1e-6 relative.
    assert cache.signals[1:] == pytest.approx([_rel_l1(inputs[1], inputs[0]), _rel_l1(inputs[2], inputs[1])],
                                              rel=1e-5)
    assert cache.accumulators == [0.0, 0.0, 0.0]  # the threshold is never reached: every step resets
    # Same latents up to step 1; step 2 starts from the reused step's latents.
    assert reusing.signals[:2] == cache.signals[:2] and reusing.computed_steps == [0, 2]
    assert reusing.accumulators == [0.0, teacache_rescale(cache.signals[1]), 0.0]


def test_fbcache_signal_and_calibration_ratios(dit, monkeypatch):
    rec, made = Recorder(dit), keep_caches(monkeypatch)
    try:
        sample(dit, CacheConfig("fbcache", threshold=1e-9), steps=3)
        calibrated = sample(dit, CacheConfig("none", calibrate=True), steps=3)
    finally:
        rec.remove()
    first_residuals = [out - args[0] for out, args in zip(rec.first_out[:3], rec.first_in[:3], strict=True)]
    assert made[0].signals[1:] == pytest.approx([_rel_l1(first_residuals[1], first_residuals[0]),
                                                 _rel_l1(first_residuals[2], first_residuals[1])], rel=1e-5)
    # Calibration: mean over tokens of ||residual_i|| / ||residual_i-1||, residual = blocks' output - input.
    residuals = [f - i for f, i in zip(rec.final_in[3:], rec.img_in[3:], strict=True)]
    ratios = calibrated.step_cache["measured_mag_ratios"]
    expected = [1.0] + [float((residuals[i].norm(dim=-1) / residuals[i - 1].norm(dim=-1)).mean())
                        for i in (1, 2)]
    assert ratios == pytest.approx(expected, rel=1e-5)
    assert calibrated.step_cache["computed_steps"] == [0, 1, 2]


@pytest.mark.parametrize("policy,threshold", [("magcache", 10.0), ("teacache", 10.0), ("fbcache", 10.0)])
def test_block_offload_reused_steps_stream_no_block(policy, threshold):
    dit = cases.build_dit()
    handle = enable_block_offload(dit, onload_device="cpu", prefetch=1)
    per_step, last = [], [0, 0]

    def count(step, t, latents):
        now = [handle.stats.onloads, handle.stats.prefetches]
        per_step.append((now[0] - last[0], now[1] - last[1]))
        last[:] = now

    try:
        out = sample(dit, CacheConfig(policy, threshold=threshold, retention=0.0), steps=4,
                     callback_on_step_end=count)
    finally:
        handle.remove()
    units = len(dit.double_blocks) + len(dit.single_blocks)
    computed = out.step_cache["computed_steps"]
    assert 0 < len(computed) < 4
    for step, moved in enumerate(per_step):
        if step in computed:
            assert moved == (units, units)
        elif policy == "fbcache":  # it runs the first double block; its look-ahead copies the second
            assert moved == (1, 2)
        else:
            assert moved == (0, 0)
    expected = sample(cases.build_dit(), CacheConfig(policy, threshold=threshold, retention=0.0), steps=4)
    assert torch.equal(out.latents, expected.latents)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["magcache", "teacache", "fbcache"])
def test_gpu_block_offload_with_cache_matches_resident(policy):
    """On an accelerator the blocks wait on the host: teacache's signal uses the host weights."""
    device = torch.device("cuda", torch.cuda.current_device())
    cache = CacheConfig(policy, threshold=10.0, retention=0.0)
    resident = cases.build_dit().to(device)
    expected = sample(resident, cache, steps=4)
    dit = cases.build_dit()
    handle = enable_block_offload(dit, onload_device=device, prefetch=1)
    try:
        out = sample(dit, cache, steps=4)
    finally:
        handle.remove()
    assert out.step_cache == expected.step_cache
    # Same kernels except teacache's modulation on the CPU (signal only): decisions equal, latents close.
    assert torch.allclose(out.latents, expected.latents, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Flags and files
# --------------------------------------------------------------------------------------------------


def test_flags_become_cache_config(tmp_path):
    assert parse_args(["--prompt", "x"]).cache == CacheConfig()
    ratios = tmp_path / "r.json"
    ratios.write_text(json.dumps({"mag_ratios": [1.0, 1.1, 0.9]}), encoding="utf-8")
    cfg = parse_args(["--prompt", "x", "--cache", "magcache", "--cache-threshold", "0.1", "--cache-max-skip",
                      "3", "--cache-retention", "0.5", "--cache-ratios", str(ratios)]).cache
    assert cfg == CacheConfig("magcache", 0.1, 3, 0.5, ratios=(1.0, 1.1, 0.9), ratios_source=str(ratios))
    assert parse_args(["--prompt", "x", "--cache", "teacache"]).cache.effective_threshold == 0.15
    assert parse_args(["--prompt", "x", "--cache", "fbcache"]).cache.effective_threshold == 0.06
    cal = parse_args(["--prompt", "x", "--cache-calibrate", str(tmp_path / "c.json")]).cache
    assert cal.calibrate and cal.calibrate_path == str(tmp_path / "c.json") and cal.enabled


@pytest.mark.parametrize("flags,needle", [
    (["--cache", "magcache", "--cache-threshold", "-0.1"], "--cache-threshold must be a number >= 0"),
    (["--cache", "teacache", "--cache-threshold", "nan"], "--cache-threshold must be a number >= 0"),
    (["--cache", "magcache", "--cache-max-skip", "-1"], "--cache-max-skip must be >= 0"),
    (["--cache", "magcache", "--cache-retention", "nan"], "--cache-retention must be between 0 and 1"),
    (["--cache-threshold", "0.2"], "has no effect without --cache"),
    (["--cache", "fbcache", "--cache-retention", "0.1"], "applies to --cache magcache only"),
    (["--cache", "teacache", "--cache-calibrate"], "use it with --cache none or magcache"),
    (["--cache", "teacache", "--cache-ratios", "r.json"], "add --cache magcache"),
    (["--cache", "magcache", "--cache-ratios", "/no/such.json"], "cannot read it"),
])
def test_bad_flags_one_line(capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--prompt", "x", *flags])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err


@pytest.mark.parametrize("content,needle", [
    ("[1.0, -2]", "finite number > 0"), ("{\"x\": 1}", "expected a JSON list"), ("[", "not valid JSON"),
    ("[1.0, NaN]", "finite number > 0"), ("[]", "expected a JSON list")])
def test_ratios_file_errors(tmp_path, content, needle):
    path = tmp_path / "r.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=needle):
        load_ratios_file(path)
    path.write_text("[1, 1.5]", encoding="utf-8")
    assert load_ratios_file(path) == (1.0, 1.5) and math.isclose(sum(load_ratios_file(path)), 2.5)


# --------------------------------------------------------------------------------------------------
# End to end: sample_video.py on the tiny checkpoint tree
# --------------------------------------------------------------------------------------------------


def test_cli_threshold_zero_is_byte_identical_and_sidecar_records_the_cache(tmp_path, capsys):
    import sample_video
    from hyvideo.testing.tiny import write_tiny_checkpoints

    tree = write_tiny_checkpoints(tmp_path / "ckpts")
    small = ["--model-base", str(tree), "--prompt", "a boat", "--seed", "5", "--video-size", "32", "48",
             "--video-length", "1", "--infer-steps", "3", "--precision", "fp32", "--vae-precision", "fp32"]
    ratios = tmp_path / "ratios.json"
    runs = {"none": [], "calibrate": ["--cache-calibrate", str(ratios)],
            "magcache": ["--cache", "magcache", "--cache-threshold", "0", "--cache-ratios", str(ratios)],
            "teacache": ["--cache", "teacache", "--cache-threshold", "0"],
            "fbcache": ["--cache", "fbcache", "--cache-threshold", "0"]}
    videos, sidecars = {}, {}
    for name, flags in runs.items():  # in order: the calibration file is written before magcache reads it
        assert sample_video.main([*small, "--save-path", str(tmp_path / name), *flags]) == 0
        (video,) = (tmp_path / name).glob("*.mp4")
        videos[name] = video.read_bytes()
        sidecars[name] = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    assert all(v == videos["none"] for v in videos.values())
    assert "step_cache" not in sidecars["none"]
    for name in ("magcache", "teacache", "fbcache"):
        record = sidecars[name]["step_cache"]
        assert record["policy"] == name and record["threshold"] == 0.0
        assert record["computed_steps"] == [0, 1, 2]
    assert sidecars["magcache"]["step_cache"]["ratios"] == str(ratios)
    measured = json.loads(ratios.read_text(encoding="utf-8"))
    assert len(measured["mag_ratios"]) == 3 and measured["mag_ratios"][0] == 1.0
    assert sidecars["calibrate"]["step_cache"]["measured_mag_ratios"] == pytest.approx(measured["mag_ratios"],
                                                                                      abs=1e-5)
    assert "MagCache ratios for 32x48x1, 3 steps" in printed
