"""Reliability report, in one run: load held, bad inputs tried, faults survived, nothing lost.

1. Load: 64 concurrent Generate streams against an inference process with batch 4 + queue 16, and 64
   concurrent Score calls (32 responses each) against an rrhf process admitting 4 in progress; three
   rounds each: outcomes by status, the server's RSS after each round, and a normal request afterwards.
2. Bad input: hypothesis-generated requests for every RPC of the three services (random field values,
   huge strings and repeated fields) plus undecodable bytes: how many were tried, the statuses they got,
   and how many were INTERNAL or UNKNOWN (must be 0).
3. Faults and security: the scenario tests under tests/reliability (disconnects, deadlines, SIGTERM,
   SIGKILL, a killed Ray worker, a restarted rrhf service, full disk, permissions, TLS/mTLS and tokens,
   size limits, path confinement, malicious pickles), run by pytest and reported one line each.
4. Nothing lost: partial outputs left anywhere under the fault runs' model roots (must be 0).

  python benchmarks/reliability.py [--rounds 3] [--examples 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULT_FILES = ["test_faults.py", "test_process_faults.py", "test_training_faults.py", "test_security.py",
               "test_paths.py", "test_bad_input.py"]  # fmt: skip


def load_report(rounds: int) -> None:
    import shutil

    from clients.inference import InferenceClient, prompt, sampling
    from clients.rrhf import RrhfClient
    from services.stack import ServiceProcess
    from tests.engine_fixtures import save_servable_tiny_model
    from tests.reliability.load import generate_round, score_round

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = save_servable_tiny_model(base / "models" / "policy")
        (base / "data").mkdir()
        shutil.copyfile(
            resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", base / "data" / "p.jsonl"
        )
        inference = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", "-1",
                                    "--max-batch-size", "4", "--max-queue", "16"], base / "inference.log")  # fmt: skip
        try:
            results = [generate_round(inference.address, inference.process.pid) for _ in range(rounds)]
            with InferenceClient(inference.address, timeout=60) as client:
                after = (
                    client.complete(prompt("after"), sampling(max_new_tokens=4)).usage.completion_tokens == 4
                )
        finally:
            inference.stop()
        _print_rounds("Generate: 64 streams vs batch 4 + queue 16", results, after)
        rrhf = ServiceProcess(["rrhf", "--model-root", str(base / "models"), "--data-root", str(base / "data"),
                               "--port", "0", "--metrics-port", "-1", "--policy-model", "policy",
                               "--max-pending-scores", "4"], base / "rrhf.log")  # fmt: skip
        try:
            with RrhfClient(rrhf.address, timeout=120) as client:
                client.score("warm up", ["a", "b"])
            results = [score_round(rrhf.address, rrhf.process.pid) for _ in range(rounds)]
            with RrhfClient(rrhf.address, timeout=60) as client:
                after = len(client.score("after", ["a", "b"]).scores) == 2
        finally:
            rrhf.stop()
        _print_rounds("Score: 64 callers (32 responses each) vs 4 in progress", results, after)


def _print_rounds(title: str, results, served_after: bool) -> None:
    print(f"\n{title}")
    print(f"{'round':>5} {'OK':>4} {'RESOURCE_EXHAUSTED':>18} {'other':>5} {'seconds':>8} {'RSS MiB':>8}")
    for number, r in enumerate(results, start=1):
        ok, full = r.codes.get(_code("OK"), 0), r.codes.get(_code("RESOURCE_EXHAUSTED"), 0)
        other = sum(r.codes.values()) - ok - full
        print(f"{number:>5} {ok:>4} {full:>18} {other:>5} {r.seconds:>8.2f} {r.rss_bytes / 2**20:>8.1f}")
    growth = results[-1].rss_bytes / results[0].rss_bytes
    print(f"RSS last / first round: {growth:.3f} (goal <= 1.10); served normally afterwards: {served_after}")


def _code(name: str):
    import grpc

    return getattr(grpc.StatusCode, name)


def fuzz_report(examples: int) -> None:
    """Runs the same strategies as tests/reliability/test_fuzz.py against in-process servers."""
    import pytest

    print("\nBad input (hypothesis, every RPC of the three services, plus undecodable bytes)")
    plugin = _FuzzCounter()
    os.environ["WOMBAT_FUZZ_EXAMPLES"] = str(examples)
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "reliability" / "test_fuzz.py")],
                       plugins=[plugin])  # fmt: skip
    print(f"requests tried: {sum(plugin.codes.values())}; statuses: "
          + ", ".join(f"{name} {n}" for name, n in plugin.codes.most_common()))  # fmt: skip
    bad = plugin.codes.get("INTERNAL", 0) + plugin.codes.get("UNKNOWN", 0)
    print(f"INTERNAL or UNKNOWN answers: {bad} (goal 0); pytest exit code {int(code)}")


class _FuzzCounter:
    """Counts the status of every call the fuzz tests make (they report through `tests.reliability.rpc`)."""

    def __init__(self):
        self.codes: Counter = Counter()

    def pytest_configure(self, config):
        from tests.reliability import rpc

        original = rpc.invoke

        def counting(*args, **kwargs):
            code, response = original(*args, **kwargs)
            self.codes[code.name] += 1
            return code, response

        rpc.invoke = counting
        import tests.reliability.test_fuzz as fuzz

        fuzz.invoke = counting


def scenario_report() -> None:
    print("\nFaults and security scenarios (tests/reliability, run by pytest)")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        base_temp = Path(tmp) / "runs"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        f"--basetemp={base_temp}", *[str(ROOT / "tests" / "reliability" / f) for f in FAULT_FILES]],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        cases = ET.parse(report).getroot().iter("testcase")
        passed = total = 0
        for case in cases:
            total += 1
            failed = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            passed += not failed and not skipped
            status = "FAILED" if failed else "skipped" if skipped else "ok"
            print(f"  {status:>7}  {case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}")
        print(f"scenarios survived: {passed}/{total}")
        partials = [p for p in base_temp.rglob("*") if ".wombat-partial-" in p.name]
        print(f"partial outputs left behind under every model root of those runs: {len(partials)} (goal 0)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=50, help="hypothesis examples per RPC")
    args = parser.parse_args()
    load_report(args.rounds)
    fuzz_report(args.examples)
    scenario_report()


if __name__ == "__main__":
    main()
