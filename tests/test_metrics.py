"""metrics.latency_figures: vLLM's definitions, on records of any system; the live view's
histogram."""

import pytest

from flover_jax import metrics
from flover_jax.viz import sparkline


def record(arrival, times, reason="length"):
    return {"arrival_s": arrival, "first_token_s": times[0] if times else None,
            "finished_s": times[-1] if times else arrival + 1.0, "token_times_s": times,
            "finish_reason": reason}


def test_latency_figures_follow_vllm_definitions():
    records = [
        record(0.0, [0.5, 1.0, 1.5]),  # ttft 0.5, tpot (1.5 - 0.5) / 2 = 0.5
        record(1.0, [1.2, 1.3]),  # ttft 0.2, tpot 0.1
        record(2.0, [], reason="error"),  # ends with an error: no tokens, no latency
    ]
    figures = metrics.latency_figures(records)
    assert figures["num_requests"] == 3 and figures["errors"] == 1
    assert figures["makespan_s"] == pytest.approx(1.5)  # first arrival to last completion
    assert figures["output_tokens"] == 5
    assert figures["output_tokens_per_s"] == pytest.approx(5 / 1.5)
    assert figures["requests_per_s"] == pytest.approx(2 / 1.5)
    assert figures["ttft_s"]["mean"] == pytest.approx(0.35)
    assert figures["tpot_s"]["mean"] == pytest.approx(0.3)
    assert figures["itl_s"]["p50"] == pytest.approx(0.5)  # gaps 0.5, 0.5 and 0.1
    assert figures["itl_s"]["max"] == pytest.approx(0.5)
    assert figures["e2e_s"]["mean"] == pytest.approx((1.5 + 0.3) / 2)


def test_single_token_requests_have_no_tpot():
    figures = metrics.latency_figures([record(0.0, [0.25])])
    assert figures["output_tokens"] == 1 and figures["ttft_s"]["p50"] == pytest.approx(0.25)
    assert figures["tpot_s"] == dict.fromkeys(("mean", "p50", "p90", "p99", "max"))  # undefined, not 0


def test_a_run_where_nothing_finished_has_zero_makespan_and_no_latencies():
    figures = metrics.latency_figures([record(3.0, [], "error"), record(1.0, [], "error")])
    assert figures["errors"] == 2 and figures["makespan_s"] == 0.0
    assert figures["output_tokens_per_s"] == figures["requests_per_s"] == 0.0
    assert all(figures[k]["p99"] is None for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"))


def test_sparkline_shows_any_request_in_flight():
    assert sparkline([0, 1, 2, 8, 16], 16) == " ▁▁▄█"
    assert sparkline([0, 0], 0) == "  "
