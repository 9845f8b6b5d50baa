"""The continuous-batching engine on a tiny random LLaMA with a real sentencepiece tokenizer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.engine_fixtures import save_servable_tiny_model, save_wired_model, text_tokens
from wombat_core.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from wombat_core.engine import engine as engine_module
from wombat_core.engine.detokenizer import IncrementalDetokenizer
from wombat_core.engine.loading import load_for_serving
from wombat_core.errors import InvalidArgument, ResourceExhausted


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_serving(
        save_servable_tiny_model(tmp_path_factory.mktemp("engine") / "tiny"), packed_kernels=True
    )


class Collector:
    """Collects a request's events; `wait()` returns (token ids, text, final event)."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finished:
            self.done.set()

    def wait(self, timeout: float = 60):
        assert self.done.wait(timeout), "request did not finish"
        final = self.events[-1]
        assert final.error is None, final.error
        return [t for e in self.events for t in e.token_ids], "".join(e.text for e in self.events), final


@pytest.fixture
def engine(loaded):
    engine = Engine(
        loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, max_queue=4, context_length=256)
    )
    engine.start()
    yield engine
    engine.stop()


def submit(engine, prompt_ids, request_id: str, **params) -> Collector:
    collector = Collector()
    engine.submit(GenerationRequest(request_id, tuple(prompt_ids), SamplingParams(**params)), collector)
    return collector


def reference_greedy(loaded, prompt_ids, max_new_tokens: int) -> list[int]:
    output = loaded.model.generate(
        torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=2, pad_token_id=loaded.tokenizer.pad_token_id,
    )  # fmt: skip
    return output[0, len(prompt_ids) :].tolist()


PROMPTS = ["Name three colours.", "The quick brown fox", "你好世界 🙂", "Below is an instruction that describes a task.",
           "café", "1234567890 times."]  # fmt: skip


@pytest.mark.parametrize("prefill_first", [True, False], ids=["prefill apart", "prefill with decode"])
def test_greedy_matches_hf_generate_alone_and_batched(loaded, prefill_first):
    engine = Engine(loaded.model, loaded.tokenizer,
                    EngineConfig(max_batch_size=4, max_queue=4, context_length=256, prefill_first=prefill_first))  # fmt: skip
    engine.start()
    try:
        ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
        alone = submit(engine, ids[0], "alone", temperature=0, max_new_tokens=24).wait()[0]
        assert alone == reference_greedy(loaded, ids[0], 24)
        collectors = []
        for i, prompt in enumerate(ids):  # staggered arrivals join a running batch; more than max_batch_size
            collectors.append(submit(engine, prompt, f"r{i}", temperature=0, max_new_tokens=24))
            time.sleep(0.003 * i)
        for prompt, collector in zip(ids, collectors, strict=True):
            assert collector.wait()[0] == reference_greedy(loaded, prompt, 24)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "prefill_first, prompt_tokens, apart",
    [(True, 3, True), (False, 3, False), (None, 3, True), (None, 200, False)],
    ids=["on", "off", "auto, a short prompt on CPU", "auto, a long prompt on CPU"],
)
def test_prefill_first_runs_a_newcomers_prefill_as_its_own_forward_before_the_decode_step(
    loaded, prefill_first, prompt_tokens, apart
):
    """While a row decodes, a newcomer's prefill runs alone and then the decode step (its first token goes out
    between the two), or, with prefill_first off (CUDA's default) or for a prompt over
    PREFILL_FIRST_MAX_TOKENS on CPU, in one forward with the decode step."""
    assert engine_module.PREFILL_FIRST_MAX_TOKENS < 200
    engine = Engine(loaded.model, loaded.tokenizer,
                    EngineConfig(max_batch_size=4, context_length=256, prefill_first=prefill_first))  # fmt: skip
    calls, step = [], engine.runner.step

    def recording_step(group, max_prefill_tokens, decode=True):
        calls.append((group is not None, decode and engine.runner.rows > 0))
        return step(group, max_prefill_tokens, decode)

    engine.runner.step = recording_step
    engine.start()
    try:
        running = submit(engine, (1, 5, 6, 7), "running", temperature=0, max_new_tokens=40, ignore_eos=True)
        while len(running.events) < 3:
            time.sleep(0.001)
        prompt = tuple(3 + i % 50 for i in range(prompt_tokens))
        newcomer = submit(engine, prompt, "newcomer", temperature=0, max_new_tokens=4, ignore_eos=True)
        running.wait(), newcomer.wait()
    finally:
        engine.stop()
    # calls: (a prefill chunk in it, a decode step in it); the first is the running request's own prefill
    joined = next(i for i, (prefill, _) in enumerate(calls) if prefill and i > 0)
    if apart:
        assert calls[joined : joined + 2] == [(True, False), (False, True)]
    else:
        assert calls[joined] == (True, True)


@pytest.mark.parametrize("admission_wait_s", [0.5, 0.0], ids=["with an admission wait", "without"])
def test_a_request_sent_on_a_final_event_joins_the_next_step(loaded, monkeypatch, admission_wait_s):
    """A caller that sends its next request 20 ms after its final event: with an admission wait, its prefill
    is the engine's next forward (no decode step of the running row comes between its final event and its
    next first token); without one, the running row's next step has begun and the newcomer waits for it."""
    monkeypatch.setattr(engine_module, "ADMISSION_WAIT_STEP_SHARE", 1000.0)  # the window is the setting
    engine = Engine(loaded.model, loaded.tokenizer,
                    EngineConfig(max_batch_size=4, context_length=256, admission_wait_s=admission_wait_s,
                                 prefill_first=True))  # fmt: skip
    order: list[tuple[str, object]] = []
    done = threading.Event()

    def sink(name):
        def record(event):
            order.append((name, event))
            if name == "first" and event.finished:  # the caller sends again a moment later
                threading.Timer(0.02, lambda: engine.submit(next_request, sink("next"))).start()
            if name == "next" and event.finished:
                done.set()

        return record

    next_request = GenerationRequest("next", (1, 8, 9), SamplingParams(temperature=0, max_new_tokens=2))
    params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
    engine.submit(GenerationRequest("running", (1, 5, 6, 7), params), sink("running"))
    engine.submit(GenerationRequest("first", (1, 5, 6), SamplingParams(temperature=0, max_new_tokens=4,
                                                                        ignore_eos=True)), sink("first"))  # fmt: skip
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.stop()
    names = [name for name, _ in order]
    final = next(i for i, (name, event) in enumerate(order) if name == "first" and event.finished)
    first_token = names.index("next")
    decode_steps_between = names[final + 1 : first_token].count("running")
    assert decode_steps_between == 0 if admission_wait_s else decode_steps_between >= 1


def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(loaded):
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(max_batch_size=2, max_prefill_tokens=16, context_length=256),
    )
    engine.start()
    try:
        prompt = loaded.tokenizer(" ".join(PROMPTS) * 2)["input_ids"]
        assert len(prompt) > 40
        running = submit(engine, prompt[:5], "short", temperature=0, max_new_tokens=30)
        long = submit(engine, prompt, "long", temperature=0, max_new_tokens=12)
        assert long.wait()[0] == reference_greedy(loaded, prompt, 12)
        assert running.wait()[0] == reference_greedy(loaded, prompt[:5], 30)
    finally:
        engine.stop()


def test_seeded_sampling_reproduces_whatever_else_runs(loaded, engine):
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    params = dict(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=20, seed=1234, ignore_eos=True)
    alone = submit(engine, prompt, "a", **params).wait()[0]
    noise = [submit(engine, loaded.tokenizer(p)["input_ids"], f"n{i}", temperature=1.0, max_new_tokens=20)
             for i, p in enumerate(PROMPTS[1:3])]  # fmt: skip
    crowded = submit(engine, prompt, "b", **params).wait()[0]
    for collector in noise:
        collector.wait()
    assert alone == crowded
    other_seed = submit(engine, prompt, "c", **{**params, "seed": 99}).wait()[0]
    assert other_seed != alone


def test_stop_sequence_spanning_two_tokens_cuts_the_text(loaded, engine):
    prompt = loaded.tokenizer(PROMPTS[3])["input_ids"]
    tokens, text, _ = submit(engine, prompt, "free", temperature=0, max_new_tokens=30, ignore_eos=True).wait()
    pieces = [loaded.tokenizer.decode(tokens[: i + 1], skip_special_tokens=True) for i in range(len(tokens))]
    # A stop string made of the last character of one token's text and the first of the next.
    boundary = next(
        i for i in range(5, len(pieces) - 1) if len(pieces[i]) > 1 and len(pieces[i + 1]) > len(pieces[i])
    )
    stop = pieces[boundary][-1] + pieces[boundary + 1][len(pieces[boundary])]
    expected = text[: text.find(stop)]
    _, stopped_text, final = submit(engine, prompt, "stop", temperature=0, max_new_tokens=30, ignore_eos=True,
                                    stop=(stop,)).wait()  # fmt: skip
    assert final.finish_reason is FinishReason.STOP
    assert stopped_text == expected and stop not in stopped_text


EOS = 2


@pytest.fixture(scope="module")
def stopping(tmp_path_factory):
    """A model that says "Red, green and blue." and then wants to stop. After each token of the sentence
    and EOS (a cycle), the next one scores 10 and the one after it 5, so whatever is held back (EOS under
    min_new_tokens, a stop token id) has a clear second choice. Returns (loaded model, sentence ids)."""
    directory = tmp_path_factory.mktemp("stopping") / "model"
    sentence = text_tokens(directory, "Red, green and blue.")
    cycle = [*sentence, EOS]
    transitions = {
        t: {cycle[(i + 1) % len(cycle)]: 10.0, cycle[(i + 2) % len(cycle)]: 5.0} for i, t in enumerate(cycle)
    }
    return load_for_serving(save_wired_model(directory, transitions), packed_kernels=True), sentence


@pytest.fixture
def stopping_engine(stopping):
    loaded, _ = stopping
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, context_length=256))
    engine.start()
    yield engine
    engine.stop()


def hf_generate(loaded, prompt_ids, **kwargs) -> list[int]:
    """The reference: HF generate, greedy, with HF's own EOS and min-new-tokens processors."""
    kwargs = {"eos_token_id": EOS, **kwargs}
    output = loaded.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=60,
                                   pad_token_id=loaded.tokenizer.pad_token_id, **kwargs)  # fmt: skip
    return output[0, len(prompt_ids) :].tolist()


def test_eos_ends_the_stream_as_in_hf_generate(stopping, stopping_engine):
    loaded, sentence = stopping
    prompt = [1, sentence[0]]
    tokens, text, final = submit(stopping_engine, prompt, "eos", temperature=0, max_new_tokens=60).wait()
    assert tokens == [*sentence[1:], EOS] == hf_generate(loaded, prompt)
    assert final.finish_reason is FinishReason.EOS and final.usage.completion_tokens == len(tokens)
    assert text == loaded.tokenizer.decode(sentence[1:], skip_special_tokens=True)  # EOS is never text


def test_min_new_tokens_holds_eos_back_as_in_hf_generate(stopping, stopping_engine):
    loaded, sentence = stopping
    prompt = [1, sentence[0]]
    minimum = len(sentence) + 2  # the model wants EOS after len(sentence) - 1 tokens
    tokens, _, final = submit(stopping_engine, prompt, "min", temperature=0, max_new_tokens=60,
                              min_new_tokens=minimum).wait()  # fmt: skip
    assert tokens == hf_generate(loaded, prompt, min_new_tokens=minimum)
    assert EOS not in tokens[:minimum] and tokens[len(sentence) - 1] == sentence[0]  # its second choice
    assert tokens[-1] == EOS and final.finish_reason is FinishReason.EOS and len(tokens) > minimum


def test_stop_token_ids_stop_the_stream_and_wait_for_min_new_tokens(stopping, stopping_engine):
    loaded, sentence = stopping
    prompt, stop = [1, sentence[0]], sentence[3]
    tokens, _, final = submit(stopping_engine, prompt, "stop", temperature=0, max_new_tokens=60,
                              stop_token_ids=(stop,)).wait()  # fmt: skip
    assert tokens == sentence[1:4] and final.finish_reason is FinishReason.STOP
    assert final.usage.completion_tokens == 3 and final.usage.prompt_tokens == 2
    # Under min_new_tokens a stop token id is held back like EOS; HF treats both as EOS ids.
    held, _, final = submit(stopping_engine, prompt, "held", temperature=0, max_new_tokens=60,
                            stop_token_ids=(stop,), min_new_tokens=5).wait()  # fmt: skip
    assert held == hf_generate(loaded, prompt, eos_token_id=[EOS, stop], min_new_tokens=5)
    assert stop not in held[:5] and len(held) > 5 and final.finish_reason is not FinishReason.LENGTH


def test_logprobs_are_the_models_own_distribution(loaded, engine):
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    _, _, _ = submit(engine, prompt, "warm", temperature=0, max_new_tokens=1).wait()
    collector = submit(engine, prompt, "lp", temperature=0, max_new_tokens=1, logprobs=True, top_logprobs=3)
    tokens, _, _ = collector.wait()
    logprob = collector.events[-1].logprobs[0]
    with torch.no_grad():
        expected = torch.log_softmax(loaded.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert logprob.token_id == tokens[0] == int(expected.argmax())
    assert logprob.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t.token_id for t in logprob.top] == expected.topk(3).indices.tolist()


def test_cancel_frees_the_slot_within_a_step(loaded):
    """A cancel takes effect before the next decode step: at most the step already running when it
    arrived still emits a token, and the slot serves the next request."""
    engine = Engine(
        loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=1, max_queue=1, context_length=256)
    )
    engine.start()
    try:
        prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
        long = submit(engine, prompt, "long", temperature=0, max_new_tokens=200, ignore_eos=True)
        while len(long.events) < 3:
            time.sleep(0.001)
        emitted, step = len(long.events), engine.stats().decode_steps
        engine.cancel("long")
        assert long.done.wait(5) and long.events[-1].finish_reason is FinishReason.CANCELLED
        tokens_after_cancel = sum(len(e.token_ids) for e in long.events[emitted:])
        assert tokens_after_cancel <= 1 and engine.stats().decode_steps - step <= 1
        assert long.events[-1].usage.completion_tokens == emitted + tokens_after_cancel < 200
        quick = submit(engine, prompt, "quick", temperature=0, max_new_tokens=3)
        assert quick.done.wait(5) and quick.events[-1].finish_reason is FinishReason.LENGTH
    finally:
        engine.stop()


def test_generate_bridges_stream_and_closing_early_cancels(loaded, engine):
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    request = GenerationRequest("bridge", tuple(prompt), SamplingParams(temperature=0, max_new_tokens=24))
    events = [event for batch in engine.generate(request) for event in batch]
    assert [t for e in events for t in e.token_ids] == reference_greedy(loaded, prompt, 24)
    assert events[-1].finish_reason is FinishReason.LENGTH and not any(e.finished for e in events[:-1])
    finished = []
    engine.on_finish = finished.append
    try:
        long = GenerationRequest(
            "closed", tuple(prompt), SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
        )
        stream = engine.generate(long)
        next(stream)
        stream.close()  # the caller stops reading: the engine drops the request
        deadline = time.monotonic() + 5
        while not finished and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [e.finish_reason for e in finished] == [FinishReason.CANCELLED]
    finally:
        engine.on_finish = None


def test_a_slot_is_free_by_the_time_its_final_event_arrives(loaded):
    """One slot, no queue: a caller that sends its next request as soon as it has read the last one's final
    event must never be refused (the engine frees the slot before it sends that event)."""
    engine = Engine(
        loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=1, max_queue=0, context_length=256)
    )
    engine.start()
    try:
        prompt = tuple(loaded.tokenizer(PROMPTS[0])["input_ids"])
        for number in range(30):
            request = GenerationRequest(f"r{number}", prompt, SamplingParams(temperature=0, max_new_tokens=2))
            batches = list(engine.generate(request))
            assert batches[-1][-1].finish_reason is FinishReason.LENGTH
    finally:
        engine.stop()


def test_full_queue_is_refused_at_once(loaded):
    engine = Engine(
        loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=1, max_queue=1, context_length=256)
    )
    engine.start()
    try:
        prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
        first = submit(engine, prompt, "1", temperature=0, max_new_tokens=200, ignore_eos=True)
        while not first.events:
            time.sleep(0.001)
        second = submit(engine, prompt, "2", temperature=0, max_new_tokens=2)  # waits in the queue
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="capacity"):
            submit(engine, prompt, "3", temperature=0, max_new_tokens=2)
        assert time.monotonic() - started < 0.5
        engine.cancel("1")
        assert second.wait()[2].finish_reason is not None
    finally:
        engine.stop()


def test_prompt_longer_than_the_context_is_invalid(loaded, engine):
    with pytest.raises(InvalidArgument, match="context is 256"):
        submit(engine, [5] * 300, "too-long", max_new_tokens=2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be >= 0"),
        ("top_k", -1, "top_k must be >= 0"),
        ("min_p", 1.1, "min_p must be in [0, 1]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("min_new_tokens", 500, "min_new_tokens must be in [0, max_new_tokens=128]"),
        ("top_logprobs", 21, "top_logprobs must be in [0, 20]"),
        ("stop", ("",), "stop sequences must be 1 to 256 characters"),
        ("seed", -1, "seed must be in [0, 2**63 - 1]"),
    ],
)
def test_sampling_params_validation_messages(field, value, message):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**{field: value})
    assert info.value.message.startswith(message)


@pytest.mark.parametrize(
    "text", ["袋熊 🦘🐨 wombat", "你好世界 🙂🚀 café", "Red, green.\n\n### Response:", "ünïcödé 12"]
)
def test_incremental_detokenizer_never_splits_a_character(loaded, text):
    tokenizer = loaded.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if text.startswith("袋熊"):  # not in the training corpus: byte-fallback tokens, 3-4 per character
        assert len(ids) > len(text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=(1,))
    chunks = [detokenizer.add(token)[0] for token in ids]
    chunks.append(detokenizer.flush())
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert len([c for c in chunks if c]) > 1  # it really streamed


def hf_prompt_logprobs(loaded, prompt_ids) -> torch.Tensor:
    """Hugging Face's forward over the prompt, log-softmax in float32: row t scores token t + 1."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def loaded_plain(tmp_path_factory):
    """The model's own forward (as on CUDA), not the lean CPU one."""
    return load_for_serving(
        save_servable_tiny_model(tmp_path_factory.mktemp("plain") / "tiny"), packed_kernels=False
    )


@pytest.mark.parametrize("forward", ["lean CPU forward", "the model's own forward"])
def test_prompt_logprobs_equal_hf_log_softmax_in_a_padded_chunked_group(request, forward):
    """Three prompts of different lengths admitted as one group (left padding), prefilled in chunks of a
    few tokens, one of them not asking: each asking prompt's logprobs equal HF's over its own ids."""
    loaded = request.getfixturevalue("loaded" if forward.startswith("lean") else "loaded_plain")
    engine = Engine(loaded.model, loaded.tokenizer,
                    EngineConfig(max_batch_size=4, context_length=256, max_prefill_tokens=12))  # fmt: skip
    assert (engine.runner._lean is not None) == forward.startswith("lean")
    texts = ["The quick brown fox jumps over the lazy dog.", "café", "Name three colours, then stop."]
    ids = [loaded.tokenizer(t)["input_ids"] for t in texts]
    collectors = []
    with engine.scheduler.lock:  # all three queued before the engine admits any: one group
        for i, (prompt, wanted) in enumerate(zip(ids, (3, None, 0), strict=True)):
            extra = {} if wanted is None else {"prompt_logprobs": wanted}
            collectors.append(submit(engine, prompt, f"p{i}", temperature=0, max_new_tokens=3, **extra))
    engine.start()
    try:
        finals = [c.wait() for c in collectors]
    finally:
        engine.stop()
    assert not collectors[1].events[0].prompt_logprobs
    for prompt, collector, top in ((ids[0], collectors[0], 3), (ids[2], collectors[2], 0)):
        scored = collector.events[0].prompt_logprobs
        reference = hf_prompt_logprobs(loaded, prompt)
        assert [s.token_id for s in scored] == prompt[1:]
        expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor([s.logprob for s in scored]), expected, atol=1e-4, rtol=0)
        for position, entry in enumerate(scored):
            assert len(entry.top) == top
            if top:
                best = reference[position].topk(top)
                assert [t.token_id for t in entry.top] == best.indices.tolist()
                torch.testing.assert_close(
                    torch.tensor([t.logprob for t in entry.top]), best.values, atol=1e-4, rtol=0
                )
        # The texts of the scored tokens, after the first token's, add up to the prompt's text.
        first = loaded.tokenizer.decode(prompt[:1], skip_special_tokens=True)
        assert first + "".join(s.text for s in scored) == loaded.tokenizer.decode(
            prompt, skip_special_tokens=True
        )
    assert all(len(tokens) == 3 for tokens, _, _ in finals)


def test_max_new_tokens_zero_scores_the_prompt_and_generates_nothing(loaded, engine):
    prompt = loaded.tokenizer("The quick brown fox")["input_ids"]
    tokens, text, final = submit(engine, prompt, "score", max_new_tokens=0, prompt_logprobs=1).wait()
    assert tokens == [] and text == "" and final.finish_reason is FinishReason.LENGTH
    assert final.usage.completion_tokens == 0 and len(final.prompt_logprobs) == len(prompt) - 1
    with pytest.raises(InvalidArgument, match="max_new_tokens must be >= 1 .0 only with prompt_logprobs"):
        SamplingParams(max_new_tokens=0)


BOUNDED_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count", "tag"],
                  "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                 "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                 "tag": {"type": "string", "maxLength": 4}}}  # fmt: skip


def test_structured_output_follows_a_json_schema_a_json_object_and_a_regex_in_one_batch(loaded, engine):
    """A random model, so nothing but the mask makes its output valid: three constrained rows and a free one
    decoded together; each constrained output is complete, valid, and ended by EOS."""
    import json
    import re

    from wombat_core.engine.sampling import StructuredOutput

    prompt = loaded.tokenizer("Answer:")["input_ids"]
    schema = StructuredOutput("json_schema", json.dumps(BOUNDED_SCHEMA))
    runs = {
        "schema": submit(
            engine, prompt, "schema", temperature=0.8, seed=1, max_new_tokens=64, structured=schema
        ),
        "object": submit(
            engine,
            prompt,
            "object",
            temperature=0.8,
            seed=2,
            max_new_tokens=200,
            structured=StructuredOutput("json_object"),
        ),  # fmt: skip
        "regex": submit(
            engine,
            prompt,
            "regex",
            temperature=0.8,
            seed=3,
            max_new_tokens=32,
            structured=StructuredOutput("regex", "[0-9]{3}-[a-z]{2}"),
        ),  # fmt: skip
        "free": submit(engine, prompt, "free", temperature=0.8, seed=4, max_new_tokens=16),
    }
    results = {name: run.wait() for name, run in runs.items()}
    value = json.loads(results["schema"][1])
    assert set(value) == {"colour", "count", "tag"} and value["colour"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99 and len(value["tag"]) <= 4
    assert results["schema"][2].finish_reason is FinishReason.EOS
    if results["object"][2].finish_reason is FinishReason.EOS:
        assert isinstance(json.loads(results["object"][1]), dict)
    else:  # an unbounded object may run out of tokens; what it made is still a valid prefix
        assert results["object"][1].startswith("{")
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", results["regex"][1])
    assert results["regex"][2].finish_reason is FinishReason.EOS


def test_an_invalid_schema_is_refused_at_submit_naming_the_field(engine):
    from wombat_core.engine.sampling import StructuredOutput

    for spec in ('{"type": "nonsense"}', "not json"):
        with pytest.raises(InvalidArgument, match="structured_output json_schema cannot be used") as caught:
            submit(engine, (5, 6), "bad", structured=StructuredOutput("json_schema", spec))
        assert caught.value.metadata["field"] == "structured_output"


def test_a_negative_admission_wait_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match="admission_wait_s must be >= 0"):
        EngineConfig(admission_wait_s=-0.001)
