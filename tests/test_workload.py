"""Workloads and the bench's solo reference: arrivals, lengths, trace and prompt records."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from flover_jax import bench, workload
from flover_jax.engine import TimedRequest
from flover_jax.sampling_params import SamplingParams


@pytest.mark.parametrize("kind, options, message", [
    ("constant", {"interval_s": math.nan}, "interval_s=nan"),
    ("constant", {"interval_s": -1.0}, "interval_s=-1.0"),
    ("constant", {"interval_s": math.inf}, "interval_s=inf"),
    ("poisson", {"rate": math.nan}, "rate=nan"),
    ("poisson", {"rate": 0.0}, "rate=0.0"),
    ("poisson", {"burstiness": math.nan}, "burstiness=nan"),
    ("poisson", {"seed": -1}, "seed=-1"),
    ("burst", {"seed": 1.5}, "seed=1.5"),
])
def test_bad_arrival_settings_are_named(kind, options, message):
    with pytest.raises(ValueError, match=f"^{message}: must be"):
        workload.arrival_times(kind, 4, **options)


def test_gamma_gaps_average_one_over_rate():
    times = workload.arrival_times("poisson", 20001, rate=4.0, burstiness=0.5, seed=3)
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(0.25, rel=0.05)


def test_synthetic_requests_take_the_given_sampling_settings():
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    requests = workload.synthetic("burst", 6, 8, "uniform:3:9", 100, params=params, seed=2)
    lengths = workload.lengths("output_len", "uniform:3:9", 6, seed=2)
    assert [r.params.max_new_tokens for r in requests] == lengths.tolist()
    for r in requests:
        assert dataclasses.replace(r.params, max_new_tokens=16) == params
        assert len(r.prompt) == 8 and all(3 <= t < 100 for t in r.prompt)


def test_lognormal_lengths_have_their_median_and_stay_in_bounds():
    drawn = workload.lengths("prompt_len", "lognormal:200:1.0:1500", 20001, seed=1)
    assert np.median(drawn) == pytest.approx(200, rel=0.05)
    assert drawn.min() >= 1 and drawn.max() == 1500  # sigma 1: some draws pass 1500, clipped
    assert np.all(workload.lengths("output_len", "lognormal:7:0:9", 5) == 7)  # sigma 0: the median
    for spec, message in (("lognormal:0:1:9", "MEDIAN >= 1"), ("lognormal:9:1", "expected N"),
                          ("gauss:3:4", "expected N"), ("uniform:5:2", "LO <= HI"), ("0", ">= 1")):
        with pytest.raises(ValueError, match=f"prompt_len=.*{message}"):
            workload.lengths("prompt_len", spec, 3)


def test_conversations_share_a_system_prompt_and_grow_turn_by_turn():
    requests = workload.synthetic("burst", 6, "uniform:2:5", "uniform:3:6", 100, seed=4,
                                  shared_prefix=10, turns=3)
    prompts = [r.prompt for r in requests]
    system = prompts[0][:10]
    assert all(p[:10] == system for p in prompts)
    assert prompts[0][10:] != prompts[3][10:]  # a new conversation after three turns
    for first, turn in ((0, 1), (1, 2), (3, 4), (4, 5)):  # each turn extends the one before,
        earlier, later = prompts[first], prompts[turn]  # by the earlier answer and a question
        assert later[: len(earlier)] == earlier
        question = len(later) - len(earlier) - requests[first].params.max_new_tokens
        assert 2 <= question <= 5
    with pytest.raises(ValueError, match="turns=0: must be an int >= 1"):
        workload.synthetic("burst", 2, 4, 4, 100, turns=0)


def write_lines(path, *records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_trace_lines_carry_any_sampling_field_over_the_defaults(tmp_path):
    trace = write_lines(
        tmp_path / "t.jsonl",
        {"arrival_s": 0.5, "prompt_ids": [4, 5], "max_new_tokens": 3, "temperature": 0.5},
        "",
        {"prompt": "hi", "stop": ["."]},
    )
    defaults = SamplingParams(max_new_tokens=7, ignore_eos=True)
    first, second = workload.read_trace(trace, defaults)
    assert first == TimedRequest([4, 5], dataclasses.replace(defaults, max_new_tokens=3,
                                                             temperature=0.5), 0.5)
    assert second == TimedRequest("hi", dataclasses.replace(defaults, stop=(".",)), 0.0)


@pytest.mark.parametrize("line, message", [
    ('{"prompt_ids": [1], "max_tokens": 3}', "2: max_tokens=3: unknown field; allowed: "),
    ('{"prompt_ids": [1], "ignore_eos": "false"}', "2: ignore_eos='false': must be a bool"),
    ('{"prompt_ids": [1], "max_new_tokens": 2.9}', "2: max_new_tokens=2.9: must be an int"),
    ('{"prompt_ids": [1], "max_new_tokens": true}', "2: max_new_tokens=True: must be an int"),
    ('{"prompt_ids": "hello"}', "2: prompt_ids='hello': must be a list of ints"),
    ('{"prompt_ids": [1], "prompt": "x"}', '2: give one of "prompt"'),
    ('{"prompt_ids": [1], "arrival_s": -5}', "2: arrival_s=-5: must be a number of seconds >= 0"),
    ('{"prompt_ids": [1], "arrival_s": "1"}', "2: arrival_s='1': must be a number"),
    ("[1, 2]", "2: expected a JSON object, got list"),
    ("{nope", "2: not JSON"),
])
def test_a_bad_trace_line_is_named(tmp_path, line, message):
    trace = write_lines(tmp_path / "t.jsonl", {"prompt_ids": [1]}, line)
    with pytest.raises(ValueError) as error:
        workload.read_trace(trace)
    assert str(error.value).startswith(f"{trace}:{message}")


def test_an_empty_or_missing_trace_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        workload.read_trace(write_lines(tmp_path / "empty.jsonl", ""))
    with pytest.raises(ValueError, match="No such file"):
        workload.read_trace(tmp_path / "missing.jsonl")


class SoloEngine:
    """Stands in for an Engine: a request alone takes 1 s to its first token and `tpot` a
    token after it, except the first run (compiles), which takes 100x longer."""

    def __init__(self, tpot):
        self.tpot, self.runs = tpot, 0

    def run(self, requests):
        (request,) = requests
        n = request.params.max_new_tokens
        slow = 100.0 if self.runs == 0 else 1.0
        self.runs += 1
        tpot = self.tpot[n]
        output = SimpleNamespace(ttft_s=slow, latency_s=slow + (n - 1) * tpot * slow,
                                 token_ids=[0] * n)
        return SimpleNamespace(outputs=[output])


def test_solo_fit_leaves_out_only_the_untimed_run():
    requests = [TimedRequest([1], SamplingParams(max_new_tokens=n)) for n in (1, 50, 100)]
    engine = SoloEngine({1: 0.0, 50: 0.02, 100: 0.04})
    ttft, tpot = bench.solo_latency_fit(engine, requests, samples=3)
    assert engine.runs == 4 and ttft == 1.0
    assert tpot == pytest.approx(0.03)  # the median of 0.02 and 0.04; the 1-token run has none
