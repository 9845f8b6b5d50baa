"""The in-house engine's failure modes found in a code read (issue 18), one regression test each.

A padded row at the context limit, KV-cache growth that fails halfway, a step that raises (the engine
dies loudly instead of serving nothing), a sink that raises, NaN logits, a tiny temperature, the text of a
stop token id, stop strings in list order, logprob texts of SentencePiece tokens, prompt ids beyond the
model's vocabulary, and the pod's CPU quota.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.core.test_engine import EOS, Collector, reference_greedy, submit
from tests.engine_fixtures import save_servable_tiny_model, save_wired_model, text_tokens
from wombat_core.cpus import available_cpus, cgroup_cpu_limit
from wombat_core.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from wombat_core.engine.detokenizer import IncrementalDetokenizer
from wombat_core.engine.kv_cache import KVCache, KVCacheFull, check_preallocation
from wombat_core.engine.loading import load_for_serving
from wombat_core.engine.output import NonFiniteLogits
from wombat_core.engine.sampler import BatchSampler, SamplingRow
from wombat_core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """The tiny random LLaMA with a context of 64 tokens."""
    directory = save_servable_tiny_model(tmp_path_factory.mktemp("short") / "tiny", context=64)
    return load_for_serving(directory, packed_kernels=True)


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    """Context 8192: the cache starts at 256 columns and must grow for long requests."""
    directory = save_servable_tiny_model(tmp_path_factory.mktemp("long") / "tiny", context=8192)
    return load_for_serving(directory, packed_kernels=True)


def _engine(loaded, **config) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(**{"max_batch_size": 4, **config}))


# --- the context limit of a padded row ---------------------------------------------------------------


def test_a_padded_row_reaches_the_full_context_without_failing_the_batch(short):
    """Prompts of 24 and 4 tokens prefilled in one group: the short one sits behind 20 columns of padding,
    yet it gets the whole context (60 new tokens, equal to HF generate's) and neither request fails."""
    engine = _engine(short, context_length=64)
    prompts = [tuple(range(3, 27)), (1, 5, 6, 7)]
    params = dict(temperature=0, max_new_tokens=200, ignore_eos=True)
    collectors = [submit(engine, prompt, f"r{i}", **params) for i, prompt in enumerate(prompts)]
    engine.start()  # both were queued before the loop ran: one prefill group
    try:
        (long_tokens, _, long_final), (short_tokens, _, short_final) = (c.wait() for c in collectors)
    finally:
        engine.stop()
    assert long_final.finish_reason is short_final.finish_reason is FinishReason.LENGTH
    assert (len(long_tokens), len(short_tokens)) == (40, 60)
    reference = short.model.generate(torch.tensor([prompts[1]]), do_sample=False, max_new_tokens=60, min_new_tokens=60,
                                     pad_token_id=short.tokenizer.pad_token_id)  # fmt: skip
    assert short_tokens == reference[0, 4:].tolist()


# --- KV-cache growth ----------------------------------------------------------------------------------


def test_kv_cache_growth_is_all_or_nothing():
    cache = KVCache(layers=3, slots=2, kv_heads=1, head_dim=4, max_capacity=1024, dtype=torch.float32,
                    device=torch.device("cpu"), initial_capacity=8)  # fmt: skip
    cache.keys[1].fill_(7.0)
    before = [*cache.keys, *cache.values]
    grown = cache._grown
    calls = []

    def fail_on_the_fourth(old, capacity):
        calls.append(capacity)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return grown(old, capacity)

    cache._grown = fail_on_the_fourth
    with pytest.raises(KVCacheFull, match="could not grow from 8 to 32 columns") as info:
        cache.ensure_capacity(20)
    assert isinstance(info.value, ResourceExhausted)
    assert cache.capacity == 8 and [*cache.keys, *cache.values] == before  # the very same tensors
    assert all(t.shape == (2, 1, 8, 4) for t in before) and bool((cache.keys[1] == 7.0).all())
    cache._grown = grown
    cache.ensure_capacity(20)
    assert cache.capacity == 32 and bool((cache.keys[1][:, :, :8] == 7.0).all())


def test_a_cache_that_cannot_grow_fails_the_newcomer_only(long, monkeypatch):
    """A running request keeps going (tokens equal to HF's) while a newcomer that needs more columns than
    the cache can allocate fails with RESOURCE_EXHAUSTED; the engine stays up."""
    engine = _engine(long, context_length=8192)
    engine.start()
    try:
        prompt = long.tokenizer("Name three colours.")["input_ids"]
        running = submit(engine, prompt, "running", temperature=0, max_new_tokens=150, ignore_eos=True)
        while not running.events:
            time.sleep(0.001)
        monkeypatch.setattr(engine.runner.cache, "_grown", _raise_oom)
        newcomer = submit(engine, prompt, "newcomer", temperature=0, max_new_tokens=2000)
        assert newcomer.done.wait(30)
        assert isinstance(newcomer.events[-1].error, KVCacheFull)
        assert running.wait()[0] == _hf_greedy(long, prompt, 150)
        assert engine.failure is None and engine.runner.cache.capacity == 256
        monkeypatch.undo()
        again = submit(engine, prompt, "again", temperature=0, max_new_tokens=300, ignore_eos=True)
        assert again.wait()[2].finish_reason is FinishReason.LENGTH and engine.runner.cache.capacity == 512
    finally:
        engine.stop()


def _raise_oom(old, capacity):
    raise RuntimeError("DefaultCPUAllocator: not enough memory (simulated)")


def _hf_greedy(loaded, prompt, new_tokens: int) -> list[int]:
    output = loaded.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=loaded.tokenizer.pad_token_id)  # fmt: skip
    return output[0, len(prompt) :].tolist()


def test_a_cache_that_does_not_fit_the_gpu_budget_is_refused_at_start_naming_a_fit():
    """LLaMA-7B in fp16 on an 80 GiB GPU: 13.5 GB of weights in use, 0.5 MiB of KV per token."""
    per_token = 2 * 32 * 32 * 128 * 2
    gib = 2**30
    check_preallocation(slots=32, context=2048, bytes_per_column=per_token, total_bytes=80 * gib,
                        in_use_bytes=int(13.5 * gib), reserve_bytes=2 * gib, utilization=0.9)  # fmt: skip
    with pytest.raises(FailedPrecondition) as info:
        check_preallocation(slots=128, context=2048, bytes_per_column=per_token, total_bytes=80 * gib,
                            in_use_bytes=int(13.5 * gib), reserve_bytes=2 * gib, utilization=0.9)  # fmt: skip
    message = info.value.message
    assert "128 slots x 2048 tokens needs 128.00 GiB" in message and "only 56.50 GiB remain" in message
    assert "--max-batch-size 56 or --max-model-len 904" in message  # 56 x 2048 and 128 x 904 both fit
    check_preallocation(slots=56, context=2048, bytes_per_column=per_token, total_bytes=80 * gib,
                        in_use_bytes=int(13.5 * gib), reserve_bytes=2 * gib, utilization=0.9)  # fmt: skip


# --- a dead engine -------------------------------------------------------------------------------------


def test_a_failing_step_kills_the_engine_loudly(short, monkeypatch):
    """A step that raises (a CUDA error, an OOM) leaves the cache in an unknown state: every request in
    flight or waiting gets UNAVAILABLE, on_death fires once, and later requests are refused at once
    instead of blocking."""
    engine = _engine(short, context_length=64, max_batch_size=1, max_queue=2)
    deaths: list[BaseException] = []
    engine.on_death.append(deaths.append)
    engine.start()
    try:
        prompt = (1, 5, 6, 7)
        running = submit(engine, prompt, "running", temperature=0, max_new_tokens=50, ignore_eos=True)
        while not running.events:
            time.sleep(0.001)
        waiting = submit(engine, prompt, "waiting", temperature=0, max_new_tokens=5)

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")

        monkeypatch.setattr(engine.runner, "step", broken)
        for collector in (running, waiting):
            assert collector.done.wait(10)
            assert isinstance(collector.events[-1].error, Unavailable)
            assert "RuntimeError: CUDA error" in collector.events[-1].error.message
        assert len(deaths) == 1 and isinstance(engine.failure, RuntimeError)
        with pytest.raises(Unavailable, match="the engine has failed"):
            submit(engine, prompt, "late", temperature=0, max_new_tokens=2)
    finally:
        engine.stop()


def test_a_sink_that_raises_does_not_kill_the_engine(short):
    engine = _engine(short, context_length=64)
    engine.start()
    try:

        def gone(event):
            raise RuntimeError("Event loop is closed")

        prompt = (1, 5, 6, 7)
        engine.submit(
            GenerationRequest("gone", prompt, SamplingParams(temperature=0, max_new_tokens=30)), gone
        )
        healthy = submit(engine, prompt, "healthy", temperature=0, max_new_tokens=20, ignore_eos=True)
        assert healthy.wait()[0] == reference_greedy(short, list(prompt), 20)
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.failure is None and engine.stats().running == 0  # the orphan was cancelled
    finally:
        engine.stop()


# --- numbers ------------------------------------------------------------------------------------------


def test_a_tiny_temperature_is_greedy(short):
    with pytest.raises(InvalidArgument):
        SamplingParams(temperature=-1e-50)
    assert SamplingParams(temperature=1e-50).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    engine = _engine(short, context_length=64)
    engine.start()
    try:
        prompt = list(short.tokenizer("Name three colours.")["input_ids"])
        tokens = submit(engine, prompt, "cold", temperature=1e-50, max_new_tokens=16, seed=3).wait()[0]
    finally:
        engine.stop()
    assert tokens == reference_greedy(short, prompt, 16)


def test_non_finite_logits_give_no_token():
    """NaN (an fp16 overflow) or +inf in a row's logits: the sampler reports -1 for that row, whether the
    row is greedy or sampled, and the other rows' tokens are the usual ones."""
    sampler = BatchSampler(3, 8, torch.device("cpu"))
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(temperature=0),
    ]
    sampler.add_rows(0, [SamplingRow(p, 1, (1,), (2,)) for p in rows])
    logits = torch.zeros(3, 8)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, 6] = 4.0
    tokens, _ = sampler.sample(logits, slice(0, 3)).to_host()
    assert tokens == [-1, -1, 6]


def test_nan_logits_fail_that_request_only(short, monkeypatch):
    engine = _engine(short, context_length=64)
    prompt = (1, 5, 6, 7)
    poisoned = submit(engine, prompt, "poisoned", temperature=0.8, seed=1, max_new_tokens=30, ignore_eos=True)
    healthy = submit(engine, prompt, "healthy", temperature=0, max_new_tokens=20, ignore_eos=True)
    step, steps = engine.runner.step, []

    def overflowing(*args, **kwargs):
        logits = step(*args, **kwargs)
        if logits.decode is not None:
            steps.append(1)
            if len(steps) == 3:
                logits.decode[0, 7] = float("nan")  # row 0 is "poisoned": it was admitted first
        return logits

    monkeypatch.setattr(engine.runner, "step", overflowing)
    engine.start()
    try:
        assert poisoned.done.wait(30)
        error = poisoned.events[-1].error
        assert isinstance(error, NonFiniteLogits) and "NaN or infinite logits" in error.message
        assert sum(len(e.token_ids) for e in poisoned.events) == 3  # the prefill token and two decode steps
        assert healthy.wait()[0] == reference_greedy(short, list(prompt), 20)
        assert engine.failure is None
    finally:
        engine.stop()


# --- stops and texts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory):
    """A wired model that says "Red, green and blue." then EOS (as in test_engine's `stopping`)."""
    directory = tmp_path_factory.mktemp("sentence") / "model"
    sentence = text_tokens(directory, "Red, green and blue.")
    cycle = [*sentence, EOS]
    transitions = {t: {cycle[(i + 1) % len(cycle)]: 10.0} for i, t in enumerate(cycle)}
    return load_for_serving(save_wired_model(directory, transitions), packed_kernels=True), sentence


def test_the_text_of_a_stop_token_id_is_not_emitted(sentence_model):
    loaded, sentence = sentence_model
    engine = _engine(loaded, context_length=256)
    engine.start()
    try:
        stop = sentence[3]
        tokens, text, final = submit(engine, [1, sentence[0]], "s", temperature=0, max_new_tokens=30,
                                     stop_token_ids=(stop,)).wait()  # fmt: skip
    finally:
        engine.stop()
    decode = loaded.tokenizer.decode
    assert tokens == sentence[1:4] and final.finish_reason is FinishReason.STOP
    assert text == decode([sentence[0], *sentence[1:3]])[len(decode([sentence[0]])) :]
    assert not text.endswith(decode([stop]).strip())


def test_stop_strings_end_the_text_at_the_earliest_occurrence(sentence_model):
    loaded, sentence = sentence_model
    ids = sentence[1:]
    full = loaded.tokenizer.decode([sentence[0], *ids])[len(loaded.tokenizer.decode([sentence[0]])) :]
    assert full.index("blue") > full.index("green")
    detokenizer = IncrementalDetokenizer(loaded.tokenizer, (1, sentence[0]), stop=("blue", "green"))
    chunks, stopped = [], False
    for token in ids:
        chunk, stopped = detokenizer.add(token)
        chunks.append(chunk)
        if stopped:
            break
    assert stopped and "".join(chunks) == full[: full.index("green")]


def test_logprob_texts_of_sentencepiece_tokens_add_up_to_the_text(sentence_model):
    """A SentencePiece "▁green" decoded alone is "green"; in context it is " green". OpenAI's `tokens` and
    `text_offset` need the texts that add up to the completion."""
    loaded, sentence = sentence_model
    engine = _engine(loaded, context_length=256)
    engine.start()
    try:
        collector = submit(engine, [1, sentence[0]], "lp", temperature=0, max_new_tokens=30, logprobs=True,
                           top_logprobs=2)  # fmt: skip
        tokens, text, _ = collector.wait()
    finally:
        engine.stop()
    texts = [lp.text for e in collector.events for lp in e.logprobs]
    pieces = loaded.tokenizer.convert_ids_to_tokens(tokens)
    assert "".join(texts) == text and len(texts) == len(tokens)
    spaced = [i for i, piece in enumerate(pieces) if piece.startswith("▁")]
    assert spaced and all(texts[i].startswith(" ") for i in spaced)
    first = collector.events[0].logprobs[0]
    assert first.top[0].token_id == tokens[0] and first.top[0].text == texts[0]


# --- validation and resources -------------------------------------------------------------------------


def test_prompt_ids_beyond_the_models_vocabulary_are_invalid(tmp_path):
    """The tokenizer knows one more token than the model's embedding has rows: that id must be refused
    before it reaches a tensor (on CUDA it is a device-side assert that kills the context)."""
    loaded = load_for_serving(save_servable_tiny_model(tmp_path / "tiny"))
    loaded.tokenizer.add_tokens(["<not-in-the-model>"])
    model_vocab = loaded.model.config.vocab_size
    assert len(loaded.tokenizer) == model_vocab + 1
    engine = _engine(loaded, context_length=256)
    assert engine.vocab_size == model_vocab
    with pytest.raises(InvalidArgument, match=rf"prompt token ids must be in \[0, {model_vocab}\)"):
        engine.submit(GenerationRequest("x", (1, model_vocab), SamplingParams()), Collector())
    with pytest.raises(InvalidArgument, match=f"stop_token_ids must be < vocab size {model_vocab}"):
        engine.submit(
            GenerationRequest("y", (1, 5), SamplingParams(stop_token_ids=(model_vocab,))), Collector()
        )


def test_cpu_threads_follow_the_pods_cpu_quota(tmp_path):
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "quota", tmp_path / "period")
    missing = (tmp_path / "none", tmp_path / "none")
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, missing) is None
    v2.write_text("150000 100000\n")  # limits.cpu: 1500m
    assert cgroup_cpu_limit(v2, missing) == 2
    v2.write_text("50000 100000\n")
    assert cgroup_cpu_limit(v2, missing) == 1 and available_cpus(v2, missing) == 1
    v1[0].write_text("400000\n")
    v1[1].write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "absent", v1) == 4
    v1[0].write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path / "absent", v1) is None


def test_events_reach_a_consumer_on_another_thread_after_death(short, monkeypatch):
    """generate() never blocks forever: a blocking consumer of a request that was waiting when the engine
    died gets the error."""
    engine = _engine(short, context_length=64, max_batch_size=1)
    engine.start()
    try:
        monkeypatch.setattr(engine.runner, "step", _broken_step)
        outcome: list[BaseException] = []

        def consume():
            try:
                for _ in engine.generate(GenerationRequest("r", (1, 5), SamplingParams(max_new_tokens=4))):
                    pass
            except Unavailable as exc:
                outcome.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and len(outcome) == 1
    finally:
        engine.stop()


def _broken_step(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
