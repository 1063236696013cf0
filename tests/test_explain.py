"""`llamalab explain` and llamalab.explain: conversion to GQA, attention maps, RoPE checks, the report
(every figure written and referenced), and the HTML opened in headless Chromium (skipped without it)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llamalab import Llama, LlamaConfig
from llamalab.cli.main import main
from llamalab.errors import ConfigError
from llamalab.explain import convert_to_gqa
from llamalab.explain.attention import attention_maps, group_similarity
from llamalab.explain.report import Lab
from llamalab.explain.rope import _rotate, capture_qk, wavelengths


def _mha(seed: int = 0) -> Llama:
    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                      max_position_embeddings=64, rope_theta=100.0)
    torch.manual_seed(seed)
    return Llama(cfg).eval()


def test_convert_to_gqa_mean_pools_each_group():
    mha = _mha()
    gqa = convert_to_gqa(mha, 2)
    assert gqa.config.n_kv_heads == 2 and gqa.config.n_heads == 4
    d = mha.config.head_dim
    for name in ("k_proj", "v_proj"):
        w = getattr(mha.layers[1].self_attn, name).weight.view(4, d, -1)
        expect = torch.stack([(w[0] + w[1]) / 2, (w[2] + w[3]) / 2]).reshape(2 * d, -1)
        torch.testing.assert_close(getattr(gqa.layers[1].self_attn, name).weight, expect)
    torch.testing.assert_close(gqa.layers[0].self_attn.q_proj.weight, mha.layers[0].self_attn.q_proj.weight)
    assert gqa.lm_head.weight is not gqa.layers[0].self_attn.q_proj.weight
    ids = torch.randint(0, 61, (2, 9))
    assert not torch.allclose(gqa(ids), mha(ids), atol=1e-4)  # pooling distinct heads changes the function


def test_convert_to_gqa_is_exact_when_heads_repeat(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 11))
    mha = convert_to_gqa(tiny_model, 4)  # 2 KV heads repeated to 4: the same function
    torch.testing.assert_close(mha(ids), tiny_model(ids), rtol=1e-5, atol=1e-5)
    back = convert_to_gqa(mha, 2)  # pooling identical heads gives the original back
    torch.testing.assert_close(back(ids), tiny_model(ids), rtol=1e-5, atol=1e-5)
    mqa = convert_to_gqa(tiny_model, 1)
    assert mqa.config.n_kv_heads == 1 and mqa.memory_report(128)["kv_cache_bytes"] * 2 == \
        tiny_model.memory_report(128)["kv_cache_bytes"]
    saved_ids = ids[:1]
    cache = mqa.new_cache(1, 32)
    step = mqa(saved_ids, cache=cache)  # runs with a 1-head cache
    torch.testing.assert_close(step, mqa(saved_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [3, 0, 8])
def test_convert_to_gqa_rejects_bad_head_counts(tiny_model, n):
    with pytest.raises(ConfigError):
        convert_to_gqa(tiny_model, n)


def test_attention_maps_reproduce_the_model(tiny_model):
    """maps @ V must equal what the attention module feeds o_proj, for every layer."""
    cfg = tiny_model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 13))
    maps = attention_maps(tiny_model, ids)
    assert maps.shape == (cfg.n_layers, cfg.n_heads, 13, 13)
    torch.testing.assert_close(maps.sum(-1), torch.ones(cfg.n_layers, cfg.n_heads, 13))
    assert torch.all(maps.triu(1) == 0)
    got = {}
    hooks = []
    for i, blk in enumerate(tiny_model.layers):
        hooks.append(blk.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("v", i), o)))
        hooks.append(blk.self_attn.o_proj.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(("o", i), a[0])))
    with torch.no_grad():
        tiny_model(ids)
    for h in hooks:
        h.remove()
    for i in range(cfg.n_layers):
        v = got[("v", i)].view(1, 13, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.repeat_interleave(cfg.n_rep, dim=1)[0]
        out = (maps[i] @ v).transpose(0, 1).reshape(13, -1)
        torch.testing.assert_close(out, got[("o", i)][0], rtol=1e-4, atol=1e-5)
    within, across = group_similarity(maps, cfg.n_rep)
    assert within.shape == (cfg.n_layers,) and ((within >= -1e-6) & (within <= 1 + 1e-6)).all()


def test_wavelengths_match_the_rope_definition():
    lam = wavelengths(128, 500000.0)
    assert lam[0] == pytest.approx(2 * math.pi)
    assert lam[-1] == pytest.approx(2 * math.pi * 500000.0 ** (126 / 128), rel=1e-5)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    l31 = wavelengths(128, 500000.0, scaling, 8192)
    fast, slow = lam < 8192 / 4, lam > 8192
    assert fast.any() and slow.any()
    assert (abs(l31[fast] / lam[fast] - 1) < 1e-5).all()
    assert (abs(l31[slow] / lam[slow] - 8) < 1e-4).all()


def test_relative_position_property_on_smollm2(smollm2, tmp_path):
    """On the real model's q/k vectors, shifting both positions leaves every score unchanged."""
    model, tok = smollm2
    lab = Lab(model, tok, "smollm2", tmp_path, quick=True)
    q, k = capture_qk(lab, 3)
    assert q.shape[1:] == (model.config.n_heads, model.config.head_dim)
    qa, kb = q[:, 0], k[:, 0]
    n = qa.shape[0]
    pos_q, pos_k = torch.arange(n) + 5, torch.arange(n)
    base = (_rotate(model.rotary, qa, pos_q) * _rotate(model.rotary, kb, pos_k)).sum(-1)
    shifted = (_rotate(model.rotary, qa, pos_q + 300) * _rotate(model.rotary, kb, pos_k + 300)).sum(-1)
    scale = qa.norm(dim=-1) * kb.norm(dim=-1)
    assert ((shifted - base).abs() / scale).max() < 1e-4
    other = (_rotate(model.rotary, qa, pos_q + 7) * _rotate(model.rotary, kb, pos_k)).sum(-1)
    assert ((other - base).abs() / scale).max() > 1e-2  # a different relative distance does change it


# ----------------------------------------------------------------------------- the whole report, --quick
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain")
    rc = main(["explain", "all", "--model", "tiny", "--out", str(out), "--quick"])
    assert rc == 0
    return out


def test_quick_report_has_every_section_and_figure(quick_report):
    page = (quick_report / "index.html").read_text(encoding="utf-8")
    for sec in ("rope", "rmsnorm", "gqa", "attention"):
        assert f'<section id="{sec}">' in page
    for path in ("model/rope.py", "model/rmsnorm.py", "model/attention.py"):
        assert path in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 10
    for src in srcs:
        data = (quick_report / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src
    assert page.count("<b>Takeaway:</b>") == len(srcs)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "nan" not in re.sub(r"<[^>]+>", " ", page).lower().split()


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["explain", "nope", "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamalab explain: error:") and "\n" not in err
    assert main(["explain", "rope", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such model" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(quick_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    url = (quick_report / "index.html").as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    n = len(re.findall(r"<img ", dom))
    assert n >= 10, dom[:500]
    assert f'data-images="{n}/{n}"' in dom  # the page's own check: every image decoded (naturalWidth > 0)
    assert dom.count('data-loaded="1"') == n
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1100,1400", url], capture_output=True,
                   timeout=120)
    assert shot.exists() and shot.stat().st_size > 10000


def test_convert_command_to_gqa(tiny_model, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "mqa"
    tiny_model.save_pretrained(src)
    assert main(["convert", str(src), str(dst), "--to-gqa", "1"]) == 0
    converted = Llama.from_pretrained(dst).eval()
    assert converted.config.n_kv_heads == 1
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 7))
    torch.testing.assert_close(converted(ids), convert_to_gqa(tiny_model, 1)(ids), rtol=1e-5, atol=1e-5)
    assert main(["convert", str(src), str(tmp_path / "bad"), "--to-gqa", "3"]) == 2
