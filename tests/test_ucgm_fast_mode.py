"""UCGM-T fast mode (``mode="fast"``): its passes, its target against the parity mode's (exact where the
computation is the same, first order in eps where the tangent is one-sided, bfloat16 rounding where the reference
passes are), training from the command line and config errors."""

import math

import pytest
import torch
from test_objective import TinyModel, _batch
from training_fixtures import TINY_GMM

from ucgm.cli import main
from ucgm.methods import UCGMObjective
from ucgm.methods.diffusion.ucgm import MODES, native_bfloat16, reference_autocast_dtype

NULL = 3


def _labelled_batch(dtype=torch.float64):
    """16 rows: 6 outside the enhanced range (0, 0.75), then 10 inside of which the last 4 are dropped (null label)."""
    data, noise, time, labels = _batch(seed=5)
    labels[-4:] = NULL
    time[:6] = 0.9
    time[6:] = torch.linspace(0.05, 0.7, 10)
    return data.to(dtype), noise.to(dtype), time.to(dtype), labels


def _target(objective, model, reference, data, noise, time, labels):
    """The target ``T`` one loss regresses the online output onto (captured at the objective's per-sample loss)."""
    captured = {}
    original = objective.per_sample_loss

    def capture(output, target):
        captured["target"] = target
        return original(output, target)

    objective.per_sample_loss = capture
    objective(model, data, labels, reference_model=reference, time=time, noise=noise, drop_labels=False)
    return captured["target"]


@pytest.mark.parametrize("style", ["ft-vs-fe", "fc-vs-fe", "fc-vs-xz"])
def test_fast_reference_passes_cover_only_the_rows_read_and_give_the_parity_target(style):
    """lambda = 0 in float64 (autocast leaves float64 alone): the fast target equals the parity one to rounding;
    the reference network sees only the kept rows (conditional) and the in-range or dropped rows (unconditional)."""
    model, reference = TinyModel(seed=0).double(), TinyModel(seed=1).double()
    data, noise, time, labels = _labelled_batch()
    targets, calls = {}, {}
    for mode in MODES:
        objective = UCGMObjective("linear", enhanced_ratio=0.5, enhanced_style=style, label_dropout=0.0, mode=mode)
        reference.calls.clear()
        targets[mode] = _target(objective, model, reference, data, noise, time, labels)
        calls[mode] = [rows for rows, _ in reference.calls]
    kept, in_range_or_dropped = 12, 10
    expected = {"ft-vs-fe": [in_range_or_dropped], "fc-vs-fe": [kept, in_range_or_dropped], "fc-vs-xz": [kept]}
    assert calls["parity"] == [16] * len(expected[style])
    assert calls["fast"] == expected[style]
    torch.testing.assert_close(targets["fast"], targets["parity"], rtol=1e-12, atol=1e-12)


def test_fast_lambda_one_tangent_is_one_sided_through_the_online_pass():
    """One tangent pass at t - eps on the enhanced path; the upper point is the online prediction at x_t."""
    model, reference = TinyModel(seed=0).double(), TinyModel(seed=1).double()
    data, noise, time, labels = _labelled_batch()
    eps = 0.005
    objective = UCGMObjective("linear", consistency_ratio=1.0, enhanced_ratio=2.0, enhanced_style="fc-vs-xz",
                              label_dropout=0.0, finite_difference_step=eps, mode="fast")
    model.calls.clear()
    got = _target(objective, model, reference, data, noise, time, labels)
    assert model.calls == [(16, False), (16, True)]  # the tangent pass at t - eps, then the online pass
    with torch.no_grad():
        tb = time[:, None]
        x_t = tb * noise + (1 - tb) * data
        online = model(x_t, time, labels)
        x_c = x_t - tb * reference(x_t, time, labels)
        z_c = x_t + (1 - tb) * reference(x_t, time, labels)
        kept = (labels != NULL)[:, None]
        in_range = (time < 0.75)[:, None]
        guided = torch.where(in_range, data + 2.0 * (x_c - data), (data + x_c) / 2)
        guided_noise = torch.where(in_range, noise + 2.0 * (z_c - noise), (noise + z_c) / 2)
        x_star, z_star = torch.where(kept, guided, data), torch.where(kept, guided_noise, noise)
        torch.testing.assert_close(tb * z_star + (1 - tb) * x_star, x_t, rtol=0, atol=1e-12)  # through x_t
        lower_time = time - eps
        x_lower = lower_time[:, None] * z_star + (1 - lower_time[:, None]) * x_star
        upper_data = x_t - tb * online
        lower_data = x_lower - lower_time[:, None] * model(x_lower, lower_time, labels)
        delta = torch.clamp((upper_data - lower_data) / eps, -1, 1)
        # linear path: alpha = t, D = alpha * gamma_hat - gamma * alpha_hat = -1 (F = z - x)
        expected = online + (tb / torch.sin(tb * math.pi / 2) * 4) * delta
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_fast_lambda_one_target_approaches_parity_at_first_order_in_eps():
    """One-sided minus central difference = (eps / 2) X'' + O(eps^2): halving eps halves the gap (no clamp)."""
    model, reference = TinyModel(seed=0).double(), TinyModel(seed=1).double()
    data, noise, time, labels = _labelled_batch()
    gaps = []
    for eps in (0.004, 0.002):
        targets = [_target(UCGMObjective("linear", consistency_ratio=1.0, enhanced_ratio=2.0,
                                         enhanced_style="fc-vs-fe", label_dropout=0.0, tangent_clip=1e9,
                                         finite_difference_step=eps, mode=mode),
                           model, reference, data, noise, time, labels) for mode in MODES]
        gaps.append(float((targets[1] - targets[0]).norm()))
    assert 0 < gaps[1] < gaps[0]
    assert gaps[0] / gaps[1] == pytest.approx(2.0, rel=0.05)


def _fast_vs_parity_gap(precision: str) -> tuple[float, float]:
    """float32 batch: the largest |fast - parity| of the enhanced target with ``reference_precision=precision``, and
    the parity target's size."""
    model, reference = TinyModel(seed=0), TinyModel(seed=1)
    data, noise, time, labels = _labelled_batch(torch.float32)
    targets = [_target(UCGMObjective("linear", enhanced_ratio=0.5, enhanced_style="fc-vs-fe", label_dropout=0.0,
                                     mode=mode, reference_precision=precision),
                       model, reference, data, noise, time, labels) for mode in MODES]
    return float((targets[1] - targets[0]).abs().max()), float(targets[0].abs().max())


def test_fast_reference_passes_run_in_bfloat16_within_its_rounding():
    """float32: the fast enhanced target differs from the parity one by bfloat16 rounding of the reference only."""
    gap, size = _fast_vs_parity_gap("bfloat16")
    assert 0 < gap <= 2**-7 * size


def test_fast_reference_passes_in_full_precision_match_parity():
    """``reference_precision=float32``: only the row subsets differ from parity, which a row-wise network does not
    see (the targets agree to float32 rounding, far below bfloat16's)."""
    gap, size = _fast_vs_parity_gap("float32")
    assert gap <= 1e-6 * size


def test_auto_reference_precision_follows_the_device():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native_bfloat16(cpu) else None
    assert reference_autocast_dtype("auto", cpu) == expected
    assert reference_autocast_dtype("bfloat16", cpu) == torch.bfloat16
    assert reference_autocast_dtype("float32", cpu) is None
    with pytest.raises(ValueError, match=r"reference_precision='half' is not allowed; allowed values: 'auto', "
                                         r"'bfloat16', 'float32'"):
        UCGMObjective("linear", mode="fast", reference_precision="half")


def test_mode_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"mode='quick' is not allowed; allowed values: 'parity', 'fast'"):
        UCGMObjective("linear", mode="quick")


def test_fast_mode_trains_from_the_command_line(tmp_path, capsys):
    base = ["train", "gmm", "--steps", "2", "--checkpoint-every", "2", *TINY_GMM, "objective.consistency_ratio=1.0",
            "objective.enhanced_ratio=2.0", "objective.enhanced_style=fc-vs-xz"]
    assert main([*base, "--run-dir", str(tmp_path / "fast"), "objective.mode=fast"]) == 0
    assert main([*base, "--run-dir", str(tmp_path / "bad"), "objective.mode=quick"]) == 2
    assert "mode='quick' is not allowed; allowed values: 'parity', 'fast'" in capsys.readouterr().err
