"""TransformersBackend on the offline tiny demo model (and VLLMBackend on it where vLLM and a GPU exist)."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from swift_callbacks.assets.tiny import build_demo_assets
from swift_callbacks.generation import (
    GenerationRequest,
    Generator,
    SamplingParams,
    TransformersBackend,
    add_backend_arguments,
    backend_from_args,
)

PROMPTS = ["What is 2 + 2?", "Name a colour.", "hi", "Explain why the sky is blue in one short sentence."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    build_demo_assets(path)
    return path


@pytest.fixture(scope="module")
def backend(model_dir):
    return TransformersBackend(str(model_dir), batch_size=2, device="cpu")


def chat(i: int, prompt: str, **params) -> GenerationRequest:
    return GenerationRequest.chat(f"r{i}", [{"role": "user", "content": prompt}], SamplingParams(**params))


def reference_greedy(backend: TransformersBackend, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """What one plain, unbatched ``generate`` call gives for this prompt."""
    tok, model = backend.tokenizer, backend.hf_model
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True), enc["input_ids"].shape[1]


def test_batched_greedy_equals_plain_generate_and_leaves_rng_alone(backend, model_dir, tmp_path):
    assert (backend.name, backend.model) == ("transformers", str(model_dir))
    torch.manual_seed(1234)
    rng_before = torch.random.get_rng_state()
    gen = Generator(backend, tmp_path, progress=False)
    results = gen.run([chat(i, p, max_tokens=6) for i, p in enumerate(PROMPTS)])
    sampled = gen.run([chat(i, p, max_tokens=6, temperature=1.0) for i, p in enumerate(PROMPTS)])
    assert torch.equal(rng_before, torch.random.get_rng_state())  # neither greedy nor sampling touched it

    for i, prompt in enumerate(PROMPTS):
        expected, prompt_len = reference_greedy(backend, prompt, 6)
        res = results[f"r{i}"]
        assert res.texts == [expected], prompt
        assert res.prompt_tokens == prompt_len and 1 <= res.completion_tokens <= 6
        assert sampled[f"r{i}"].ok
    assert gen.run([chat(i, p, max_tokens=6) for i, p in enumerate(PROMPTS)])["r3"].cached  # cache works here


def test_seeded_sampling_is_reproducible(backend):
    def run(seed):
        reqs = [chat(i, p, max_tokens=8, temperature=1.0, n=2, seed=seed) for i, p in enumerate(PROMPTS[:2])]
        return {k: r.texts for k, r in Generator(backend, None, progress=False).run(reqs).items()}

    first = run(7)
    assert first == run(7)
    assert all(len(texts) == 2 for texts in first.values())


def test_greedy_with_n_gives_n_copies(backend):
    res = Generator(backend, None, progress=False).run([chat(0, PROMPTS[0], max_tokens=5, n=3)])["r0"]
    single = Generator(backend, None, progress=False).run([chat(0, PROMPTS[0], max_tokens=5)])["r0"]
    assert res.texts == single.texts * 3 and res.completion_tokens == 3 * single.completion_tokens


def test_stop_strings_cut_the_text(backend):
    plain = Generator(backend, None, progress=False).run([chat(0, PROMPTS[0], max_tokens=6)])["r0"].texts[0]
    stop = plain[2:4] if len(plain) >= 4 else plain
    cut = Generator(backend, None, progress=False).run([chat(0, PROMPTS[0], max_tokens=6, stop=(stop,))])["r0"]
    assert cut.ok and stop not in cut.texts[0] and plain.startswith(cut.texts[0])


def test_loaded_objects_and_factory(backend, model_dir):
    objects = TransformersBackend(backend.hf_model, tokenizer=backend.tokenizer, batch_size=3)
    assert objects.model == backend.hf_model.name_or_path
    parser = add_backend_arguments(argparse.ArgumentParser())
    built = backend_from_args(parser.parse_args(["--local-model", str(model_dir), "--batch-size", "4"]))
    assert isinstance(built, TransformersBackend) and built.batch_size == 4 and built.model == str(model_dir)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vLLM and a GPU"
)
def test_vllm_backend_on_the_tiny_model(model_dir):  # pragma: no cover - runs only where vLLM is installed
    from swift_callbacks.generation import VLLMBackend

    backend = VLLMBackend(str(model_dir), gpu_memory_utilization=0.2, enforce_eager=True)
    results = Generator(backend, None, progress=False).run([chat(i, p, max_tokens=6) for i, p in enumerate(PROMPTS)])
    assert all(r.ok and len(r.texts) == 1 and r.completion_tokens >= 1 for r in results.values())


def test_local_checkpoint_is_cached_by_content_not_path(tmp_path, monkeypatch):
    from swift_callbacks.assets.tiny import build_model, build_tokenizer, demo_corpus

    tok = build_tokenizer(demo_corpus())
    path, cache = tmp_path / "ckpt", tmp_path / "cache"
    req = [chat(0, "What is 2 plus 2?", max_tokens=8)]
    identities = []
    for seed in (0, 1):  # a retrained checkpoint written over the same path
        build_model(tok, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        backend = TransformersBackend(str(path), device="cpu")
        identities.append(backend.cache_identity)
        fresh = Generator(backend, None, progress=False).run(req)["r0"].texts
        cached = Generator(backend, cache, progress=False).run(req)["r0"]
        assert not cached.cached and cached.texts == fresh
    assert identities[0] != identities[1]
    monkeypatch.chdir(tmp_path)  # "./ckpt" and the absolute path are one model
    again = Generator(TransformersBackend("./ckpt", device="cpu"), cache, progress=False).run(req)["r0"]
    assert again.cached
