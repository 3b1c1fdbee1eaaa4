"""The diagnostic scripts under scripts/."""

import importlib.util
import os

import pytest
import torch

from olmoearth_fast.modalities import MaskValue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_padding_report_counts():
    count = _load("padding_report").count
    on, dec, miss = int(MaskValue.ONLINE_ENCODER), int(MaskValue.DECODER), int(MaskValue.MISSING)
    codes = torch.tensor([[on, on, on, dec, miss],    # 3 online, 1 decoder
                          [on, dec, dec, dec, miss]])  # 1 online, 3 decoder
    c = {k: float(v) for k, v in count(codes).items()}
    assert c["encoder_tokens"] == 4 and c["encoder_tokens_padded"] == 6
    assert c["decoder_queries"] == 4 and c["decoder_queries_padded"] == 6
    assert c["encoder_scores"] == 9 + 1 and c["encoder_scores_padded"] == 2 * 9
    assert c["decoder_scores"] == 1 * 3 + 3 * 1 and c["decoder_scores_padded"] == 2 * 3 * 3


def test_loss_curve_windows_and_verdict():
    pytest.importorskip("olmoearth_pretrain")
    mod = _load("compare_loss_curves")
    g = torch.Generator().manual_seed(0)
    batch_effect = torch.randn(200, generator=g).tolist()  # shared by both: cancels in the pairs
    ref = [4.0 + b for b in batch_effect]
    noisy = [r + 0.01 * float(e) for r, e in zip(ref, torch.randn(200, generator=g))]
    rows = mod.paired_windows(noisy, ref, 20)
    assert [(r["first"], r["last"]) for r in rows][:2] == [(1, 20), (21, 40)] and len(rows) == 10
    assert rows[0]["ours"] == pytest.approx(sum(noisy[:20]) / 20)
    assert rows[0]["diff"] == pytest.approx(sum(a - b for a, b in zip(noisy[:20], ref[:20])) / 20)
    assert mod.within_noise(rows)["ok"]
    shifted = [x + 0.01 for x in noisy]  # a systematic offset of one per-step noise sd: detected
    verdict = mod.within_noise(mod.paired_windows(shifted, ref, 20))
    assert not verdict["ok"] and verdict["p_offset"] < 1e-4 and verdict["mean_diff"] == pytest.approx(0.01, abs=0.003)
    assert "DIFFER" in verdict["text"]
    # a difference that grows from nothing (the slope test; the offset test alone misses it)
    growing = [x + 0.03 * (i / 200 - 0.5) for i, x in enumerate(noisy)]
    verdict = mod.within_noise(mod.paired_windows(growing, ref, 20))
    assert not verdict["ok"] and verdict["p_drift"] < 1e-3 < verdict["p_offset"]
    assert mod.within_noise(mod.paired_windows(noisy[:79], ref[:79], 20))["text"].startswith("curves too short")
    assert mod.within_noise(mod.paired_windows(noisy[:81], ref[:81], 20))["windows"] == 4  # partial window left out


def test_student_t_p_values():
    pytest.importorskip("olmoearth_pretrain")
    p = _load("compare_loss_curves").t_two_sided_p
    # two-sided quantiles from tables: (t, dof, p)
    for t, dof, want in [(12.706, 1, 0.05), (4.303, 2, 0.05), (3.182, 3, 0.05), (2.776, 4, 0.05),
                         (3.250, 9, 0.01), (2.262, 9, 0.05), (3.355, 8, 0.01), (2.000, 60, 0.05)]:
        assert p(t, dof) == pytest.approx(want, rel=2e-3), (t, dof)
        assert p(-t, dof) == p(t, dof)
    assert p(0.0, 5) == pytest.approx(1.0) and p(float("inf"), 3) == 0.0
    with pytest.raises(ValueError, match="dof"):
        p(1.0, 0)


def test_loss_curve_verdict_false_alarms_with_correlated_noise():
    """Per-step differences that share noise over several steps (AR(1), correlation 0.8 from one
    step to the next, as two training runs drifting apart and back): the verdict's false-alarm
    rate stays near its level (1%). (The verdict before, a z-score per window from its own
    steps' spread, alarmed in 99% of such runs.)"""
    pytest.importorskip("olmoearth_pretrain")
    mod = _load("compare_loss_curves")
    g = torch.Generator().manual_seed(1)
    runs, alarms = 400, 0
    for _ in range(runs):
        e = torch.randn(200, generator=g, dtype=torch.float64)
        d = torch.empty_like(e)
        d[0] = e[0]
        for i in range(1, 200):
            d[i] = 0.8 * d[i - 1] + 0.6 * e[i]
        alarms += not mod.within_noise(mod.paired_windows(d.tolist(), [0.0] * 200, 20))["ok"]
    assert alarms / runs <= 0.03, alarms


def test_loss_curve_verdict_across_runs(tmp_path):
    """Several runs (seeds) judged together: an offset common to them is found though no run
    alone finds it; one run that jumped apart alarms on its own but not across the runs; fewer
    than 3 runs are not judged. `--combine` does the same from the JSON files."""
    pytest.importorskip("olmoearth_pretrain")
    import json
    import subprocess
    import sys

    mod = _load("compare_loss_curves")
    g = torch.Generator().manual_seed(2)

    def run(offset):
        d = (offset + 0.02 * torch.randn(200, generator=g, dtype=torch.float64)).tolist()
        return d, mod.within_noise(mod.paired_windows(d, [0.0] * 200, 20))

    common = [run(0.003)[1] for _ in range(12)]  # 0.003: about twice one run's standard error
    verdict = mod.across_runs(common)
    assert not verdict["ok"] and verdict["p_offset"] < 1e-3 and verdict["runs"] == 12
    assert verdict["alarms"] <= 3 and "DIFFER" in verdict["text"]
    curves = [run(0.0) for _ in range(7)] + [run(-0.04)]  # one run apart from step 1 on
    verdicts = [v for _, v in curves]
    assert not verdicts[-1]["ok"]
    verdict = mod.across_runs(verdicts)
    assert verdict["ok"] and verdict["alarms"] >= 1, verdict["text"]
    assert mod.across_runs(verdicts[:2])["text"].startswith("too few runs")
    paths = []
    for i, (d, _) in enumerate(curves):
        paths.append(tmp_path / f"run{i}.json")
        setup = {"init_seed": i, "steps": 400 if i == 0 else 200}  # run 0 cut short
        paths[-1].write_text(json.dumps({"ours": d, "ref": [0.0] * 200, "setup": setup, "complete": i != 0}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_loss_curves.py"), "--combine",
                           *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verdict["text"] in proc.stdout and "(init seed 7): curves DIFFER" in proc.stdout
    assert "(init seed 0, 200 of 400 steps): curves agree" in proc.stdout  # a run cut short says so
    (tmp_path / "bad.json").write_text("{}")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_loss_curves.py"), "--combine",
                           str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not a run written by --out" in proc.stderr


def test_profile_step_categories():
    pytest.importorskip("olmoearth_pretrain")
    categorise = _load("profile_step").categorise
    expected = {
        "aten::mm": "matmul", "aten::addmm": "matmul", "mkldnn::_linear_pointwise": "matmul",
        "aten::convolution_backward": "matmul",
        "olmoearth_fast::segment_attention_fwd": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "olmoearth_fast::bias_gelu_bwd": "elementwise / norms", "aten::native_layer_norm": "elementwise / norms",
        "olmoearth_fast::gather_rows": "data movement / indexing", "aten::copy_": "data movement / indexing",
        "aten::_fused_adamw_": "optimizer",
    }
    assert {name: categorise(name) for name in expected} == expected


def test_profile_step_clock_times_operators_and_gemms():
    """`--clock`'s clock: every operator below autograd timed and sorted, each GEMM's FLOPs and
    its warm repeats (which leave the step's values alone), in a pass of their own."""
    pytest.importorskip("olmoearth_pretrain")
    mod = _load("profile_step")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, generator=g, requires_grad=True)
    w, b = torch.randn(48, 32, generator=g, requires_grad=True), torch.randn(48, generator=g, requires_grad=True)

    def step(inputs):
        out = torch.nn.functional.gelu(torch.nn.functional.linear(inputs, w, b)) @ torch.ones(48, 8)
        out.sum().backward()
        return out.detach()

    expected = step(x)
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    per, plain, clocked, clock = mod.clock_steps(step, [x], steps=2)
    with mod._Clock():  # once more under a clock that repeats the GEMMs: values and gradients unchanged
        for t in (x, w, b):
            t.grad = None
        got = step(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for t, grad in zip((x, w, b), grads):
        torch.testing.assert_close(t.grad, grad, rtol=0, atol=0)
    # forward: addmm [96,32]x[32,48] and mm [96,48]x[48,8]; backward: the mm's input gradient,
    # the linear's input and weight gradients: 5 GEMMs a step, two steps a pass; the operators
    # clocked in the first pass, the GEMMs repeated in the second
    flops = sorted({f for f, _, _ in clock.gemms})
    assert 2.0 * 96 * 32 * 48 in flops and 2.0 * 96 * 48 * 8 in flops
    assert len(clock.gemms) == 2 * 5 and not clock.repeat_gemms  # the operators timed without repeats
    assert all(t > 0 and warm > 0 for _, t, warm in clock.gemms)
    assert per["matmul"] > 0 and "elementwise / norms" in per and plain > 0 and clocked > 0
    assert clock.calls["aten::mm"] + clock.calls["aten::addmm"] == 2 * 5
    text = mod.gemm_rates(clock, min_flops=0)
    assert "GFLOP/s in the step" in text and "repeated at once on warm operands" in text
    assert mod.gemm_rates(mod._Clock()) == "no GEMMs"


def test_profile_step_clock_end_to_end(tmp_path):
    """`profile_step.py --clock` on a small step: the table, ours beside ref_best, and the GEMM
    lines; on CUDA the flag is refused."""
    pytest.importorskip("olmoearth_pretrain")
    import subprocess
    import sys

    script = os.path.join(ROOT, "scripts", "profile_step.py")
    args = ["--size", "nano", "--batch", "2", "--steps", "1", "--clock", "--top", "3"]
    proc = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "each operator clocked below autograd" in proc.stdout and "| **step (clocked)** |" in proc.stdout
    assert "| between operators |" in proc.stdout and "ours's GEMMs:" in proc.stdout
    assert "ref_best's GEMMs:" in proc.stdout and "matmul peak probed now:" in proc.stdout
    assert "ours: the 3 operators of largest clocked time" in proc.stdout
    assert "[matmul] aten::mm" in proc.stdout or "[matmul] aten::addmm" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--clock", "--device", "cuda"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--clock times operators on the host: CPU only" in proc.stderr


def test_compare_loss_curves_self_runs(tmp_path):
    """`--compare self` end to end on a few steps: two copies of ours from the same weights, the
    JSON with both curves, the windows and the verdict."""
    pytest.importorskip("olmoearth_pretrain")
    import json
    import subprocess
    import sys

    out = tmp_path / "curves.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_loss_curves.py"), "--compare", "self",
                           "--steps", "4", "--window", "1", "--samples", "16", "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "comparing ours_a (A) with ours_b (B)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["complete"] and result["setup"]["sides"] == ["ours_a", "ours_b"]
    assert len(result["ours"]) == len(result["ref"]) == 4
    assert all(3.0 < x < 6.0 for x in result["ours"] + result["ref"])  # the demo recipe starts near 4.3
    assert result["verdict"]["windows"] == 4 and result["verdict"]["text"] in proc.stdout


def test_profile_step_toggle_end_to_end(tmp_path):
    """`profile_step.py --toggle NAME`: ours only, the kernel on and off in turn, the table and
    the per-round ratio; a module without a kernel is refused by name."""
    pytest.importorskip("olmoearth_pretrain")
    import subprocess
    import sys

    from olmoearth_fast.ops import residual_norm

    script = os.path.join(ROOT, "scripts", "profile_step.py")
    args = ["--size", "nano", "--batch", "2", "--steps", "2", "--toggle", "residual_norm"]
    proc = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if not residual_norm.kernel_available():
        assert proc.returncode != 0 and "its kernel is not available on this machine" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours with ops.residual_norm's kernel on and off" in proc.stdout
    assert "| median step |" in proc.stdout and "off / on, per round: median" in proc.stdout
    assert "(range " in proc.stdout and "2 rounds)" in proc.stdout
    for name in ("no_such_op", "packing"):
        proc = subprocess.run([sys.executable, script, "--toggle", name], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and f"--toggle {name}: not an op module with a kernel" in proc.stderr


def test_profile_step_toggle_patches_and_restores():
    """`toggle_steps` runs the step with the kernel on and off in ABBA order and puts the
    module's `kernel_available` back."""
    pytest.importorskip("olmoearth_pretrain")
    mod = _load("profile_step")
    from olmoearth_fast.ops import residual_norm

    original = residual_norm.kernel_available
    seen = []
    times = mod.toggle_steps(lambda b: seen.append(residual_norm.kernel_available()), [0, 1], 3, residual_norm)
    assert residual_norm.kernel_available is original
    k = original()
    assert seen == [k, k, False, False] + [k, False, False, k, k, False]
    assert len(times["on"]) == len(times["off"]) == 3
    assert "off / on, per round: median" in mod.toggle_report(times)
