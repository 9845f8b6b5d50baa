"""Overload drivers shared by the load tests and benchmarks/reliability.py: many concurrent calls at once
against a service process, every outcome counted, the server's memory measured between rounds."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psutil

from clients.inference import InferenceClient, prompt, sampling
from clients.rrhf import RrhfClient


@dataclass
class Round:
    codes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    rss_bytes: int = 0  # the server's resident memory after the round
    tokens: int = 0


def _run_concurrently(n: int, call) -> Counter:
    codes: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        try:
            call(i)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        with lock:
            codes[code] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def generate_round(address: str, pid: int, streams: int = 64, max_new_tokens: int = 32,
                   timeout: float = 120) -> Round:  # fmt: skip
    """`streams` Generate calls at the same instant, each read to its end."""
    result = Round()
    tokens = Counter()
    with InferenceClient(address, timeout=timeout) as client:

        def call(i: int) -> None:
            params = sampling(temperature=0.8, seed=i, max_new_tokens=max_new_tokens, ignore_eos=True)
            for response in client.generate(prompt(f"Tell me about load number {i}."), params):
                tokens[i] += len(response.token_ids)

        started = time.monotonic()
        result.codes = _run_concurrently(streams, call)
        result.seconds = time.monotonic() - started
    result.tokens = sum(tokens.values())
    result.rss_bytes = psutil.Process(pid).memory_info().rss
    return result


def score_round(
    address: str, pid: int, callers: int = 64, responses: int = 16, timeout: float = 120
) -> Round:
    """`callers` Score calls at the same instant, each ranking `responses` candidates (enough work per
    call that the calls overlap, so the admission limit is really exercised)."""
    result = Round()
    candidates = [f"Candidate {n}: " + "a colour such as red, green or blue " * 3 for n in range(responses)]
    with RrhfClient(address, timeout=timeout) as client:

        def call(i: int) -> None:
            client.score(f"Question {i}: name a colour.", candidates)

        started = time.monotonic()
        result.codes = _run_concurrently(callers, call)
        result.seconds = time.monotonic() - started
    result.rss_bytes = psutil.Process(pid).memory_info().rss
    return result
