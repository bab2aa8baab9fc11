"""Time/cost estimator with hand-checked numbers."""

from __future__ import annotations

import pytest

from gpt2_training.cli import main as cli_main
from gpt2_training.estimate import estimate, extrapolate_tokens_per_s
from gpt2_training.metrics import flops_per_token


def test_hand_checked_time_and_cost():
    # 9e9 tokens / 500,000 tokens/s = 18,000 s = 5 h; 5 h x 8 GPUs = 40 GPU-h; x 2.5 = 100.
    est = estimate("gpt2-small", 9e9, 500_000, num_gpus=8, price_per_gpu_hour=2.5)
    assert est.seconds == pytest.approx(18_000)
    assert est.hours == pytest.approx(5.0)
    assert est.gpu_hours == pytest.approx(40.0)
    assert est.cost == pytest.approx(100.0)
    # gpt2-small with the padded vocabulary: 124,475,904 parameters (GPT-2's 124,439,808 + 47 x 768).
    assert est.n_params == 124_439_808 + 47 * 768
    assert est.flops_per_token == pytest.approx(6 * est.n_params + 12 * 12 * 768 * 1024)


def test_parameter_count_and_no_price():
    est = estimate(1_000_000_000, 2e10, 1e6, num_gpus=4)
    assert est.flops_per_token == 6e9
    assert est.hours == pytest.approx(2e4 / 3600)  # 20,000 s
    assert est.cost is None
    assert est.achieved_tflops_per_gpu == pytest.approx(1e6 * 6e9 / 4 / 1e12)  # 1,500 TFLOP/s per GPU


def test_extrapolation_scales_by_flops_per_token():
    tps, note = extrapolate_tokens_per_s(300_000, "gpt2-small", "gpt2-medium")
    small = flops_per_token(124_475_904, 12, 768, 1024)
    medium = flops_per_token(354_871_296, 24, 1024, 1024)  # 354,823,168 + 47 x 1024 (padded vocabulary)
    assert tps == pytest.approx(300_000 * small / medium)
    assert "same MFU" in note
    assert extrapolate_tokens_per_s(1000, 100, 200)[0] == pytest.approx(500)


def test_cli(capsys):
    out = cli_main(
        [
            "estimate",
            "--preset",
            "gpt2-small",
            "--tokens",
            "9e9",
            "--tokens_per_s",
            "500000",
            "--gpus",
            "8",
            "--price_per_gpu_hour",
            "2.5",
        ]
    )
    text = capsys.readouterr().out
    assert out["cost"] == pytest.approx(100.0) and "5.00 h" in text and "100.00" in text
    out = cli_main(
        [
            "estimate",
            "--preset",
            "gpt2-medium",
            "--tokens",
            "1e9",
            "--from_preset",
            "gpt2-small",
            "--from_tokens_per_s",
            "300000",
        ]
    )
    assert "EXTRAPOLATED" in capsys.readouterr().out and out["extrapolated_from"]
    out = cli_main(
        ["estimate", "--n_params", "1e8", "--tokens", "1e9", "--tokens_per_s_per_gpu", "1e5", "--gpus", "2"]
    )
    assert out["tokens_per_s"] == 2e5 and out["seconds"] == pytest.approx(5000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "9e9", "--tokens_per_s", "0"], "tokens_per_s must be > 0, got 0"),
        (["--tokens", "-1", "--tokens_per_s", "1000"], "tokens must be > 0, got -1"),
        (["--tokens", "9e9", "--tokens_per_s", "1000", "--gpus", "0"], "num_gpus must be >= 1, got 0"),
        (
            ["--tokens", "9e9", "--tokens_per_s", "1000", "--price_per_gpu_hour", "-2"],
            "price_per_gpu_hour must be >= 0, got -2",
        ),
    ],
)
def test_estimate_refuses_impossible_numbers_with_one_line_and_status_2(argv, message, capsys):
    from gpt2_training.cli import run

    assert run(["estimate", "--preset", "gpt2-small", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.py estimate: ") and message in err and "\n" not in err
