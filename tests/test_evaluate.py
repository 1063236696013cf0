"""Evaluation: perplexity equals transformers' strided computation, windows cover every token once,
bits per byte adds up, KL(self) = 0 and KL(perturbed) > 0, generation metrics, multiple choice,
the bundled tasks and the lm-evaluation-harness adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llamalab import Llama, LlamaConfig, LlamalabError
from llamalab.data.corpora import Document
from llamalab.eval import (
    distinct_n,
    generation_quality,
    kl_divergence,
    kl_divergence_of_ids,
    loglikelihoods,
    multiple_choice,
    perplexity,
    perplexity_of_ids,
    repeated_ngram_rate,
)
from llamalab.eval.multichoice import Item, builtin_tasks, encode_pair, load_task
from llamalab.eval.perplexity import encode_documents
from llamalab.eval.windows import rolling_windows, strided_windows

TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die—to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream—ay, there's the rub:
"""


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tok():
    from llamalab.tokenization.bpe import train_tokenizer

    return train_tokenizer([TEXT * 3], vocab_size=300)


def _model(tok, seed: int = 0, ctx: int = 256) -> Llama:
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4,
                      n_kv_heads=2, max_position_embeddings=ctx, rope_theta=500.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():  # larger weights than the init: a peakier, more interesting distribution
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


def _hf_strided_ppl(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The strided sliding-window recipe of HF's perplexity guide, counting each window's scored tokens."""
    enc = torch.tensor([ids])
    seq_len = enc.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())  # labels are shifted inside the model
        nll_sum += float(loss) * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length,stride", [(48, 16), (40, 40), (256, 128)])
def test_perplexity_matches_transformers(tmp_path, tok, model, max_length, stride):
    from transformers import LlamaForCausalLM

    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tok.encode(TEXT, add_bos=False)
    assert len(ids) > max_length  # several windows
    ref, n_ref = _hf_strided_ppl(hf, ids, max_length, stride)
    res = perplexity_of_ids(model, [ids], max_length=max_length, stride=stride, batch_size=3)
    assert res.tokens == n_ref
    assert res.perplexity == pytest.approx(ref, rel=1e-3)
    assert res.perplexity == pytest.approx(ref, rel=1e-5)  # in fact float32 round-off only
    lo, hi = res.perplexity_ci
    assert lo <= res.perplexity <= hi


@pytest.mark.parametrize("n,L,S", [(1, 8, 4), (2, 8, 4), (7, 8, 4), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 8, 1),
                                   (33, 16, 15)])
def test_windows_cover_each_token_once(n, L, S):
    ids = list(range(n))
    for windows, every in ((strided_windows(ids, L, S), S < L), (rolling_windows(ids, L), True)):
        scored = [t for w in windows for t in w.ids[w.first_target:]]
        assert len(scored) == len(set(scored))
        assert all(len(w.ids) <= L and w.first_target >= 1 for w in windows)
        if every:
            assert scored == ids[1:]
    for w in rolling_windows(ids, L)[1:]:
        assert len(w.ids) == min(L, n)  # as much context as fits, the last window end-aligned


def test_window_arguments_are_checked(model):
    with pytest.raises(LlamalabError, match="stride"):
        perplexity_of_ids(model, [[1, 2, 3]], max_length=8, stride=9)
    with pytest.raises(LlamalabError, match="max_length"):
        perplexity_of_ids(model, [[1, 2, 3]], max_length=1000)
    with pytest.raises(LlamalabError, match="vocabulary"):
        perplexity_of_ids(model, [[1, 2, 10_000]], max_length=8)


def test_bits_per_byte_adds_up(tok, model):
    docs = [TEXT[:250], "Hello there.\nA second, shorter document!\n", "Thrice:\n" + TEXT[250:400]]
    res = perplexity(model, tok, docs, max_length=64, stride=32, n_boot=200)
    enc = encode_documents(tok, [Document(str(i), d) for i, d in enumerate(docs)])
    assert res.bytes == sum(len(d.encode()) for d in docs)  # every text token scored after the start token
    assert res.tokens == sum(len(e.ids) - 1 for e in enc)
    assert all(e.ids[0] == tok.eos_token_id for e in enc)  # no BOS in this tokenizer: EOS starts a document
    total_bits = res.cross_entropy * res.tokens / math.log(2)
    assert res.bits_per_byte == pytest.approx(total_bits / res.bytes, rel=1e-9)
    assert res.bits_per_token == pytest.approx(res.cross_entropy / math.log(2))
    assert res.documents == 3 and res.ci_unit == "windows"
    # scored all at once (one window per document), the same numbers
    whole = perplexity(model, tok, docs, max_length=256, stride=256, n_boot=0)
    assert whole.windows == 3
    manual = 0.0
    for e in enc:
        logp = F.log_softmax(model(torch.tensor([e.ids])), -1)[0]
        manual -= float(logp[:-1].gather(1, torch.tensor(e.ids[1:])[:, None]).sum())
    assert whole.cross_entropy == pytest.approx(manual / whole.tokens, rel=1e-5)


def test_max_tokens_caps_and_keeps_bytes_exact(tok, model):
    docs = [TEXT * 4, TEXT]
    res = perplexity(model, tok, docs, max_length=64, max_tokens=300, n_boot=0)
    assert res.tokens <= 300 and res.tokens > 200
    enc = encode_documents(tok, [Document(str(i), d) for i, d in enumerate(docs)],
                           max_tokens=300)
    texts = [tok.decode(e.ids[1:]) for e in enc]
    assert sum(len(t.encode()) for t in texts) == res.bytes
    assert all(d.startswith(t) for d, t in zip(docs, texts))


def test_kl_self_is_zero_and_perturbed_is_positive(tok, model):
    ids = [tok.encode(TEXT, add_bos=False)]
    same = kl_divergence_of_ids(model, model, ids, max_length=48, stride=24, n_boot=100)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-6) and same.kl_max < 1e-5
    assert same.top1_agreement == 1.0 and same.perplexity == pytest.approx(same.reference_perplexity)
    noisy = _model(tok)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    diff = kl_divergence_of_ids(noisy, model, ids, max_length=48, stride=24, n_boot=100)
    assert diff.kl_mean > 1e-3 and diff.kl_p99 >= diff.kl_median > 0
    assert diff.kl_mean_ci[0] > 0
    assert diff.reference_perplexity == pytest.approx(perplexity_of_ids(model, ids, max_length=48,
                                                                        stride=24).perplexity, rel=1e-5)
    # KL(P‖Q) by hand on one short window
    short = [ids[0][:20]]
    r = kl_divergence_of_ids(noisy, model, short, max_length=20, stride=20, n_boot=0)
    lp = F.log_softmax(model(torch.tensor(short)), -1)[0, :-1]
    lq = F.log_softmax(noisy(torch.tensor(short)), -1)[0, :-1]
    assert r.kl_mean == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-4)


def test_kl_refuses_a_different_tokenizer(tok, model):
    from llamalab.tokenization.bpe import train_tokenizer

    other_tok = train_tokenizer(["completely different text " * 50 + TEXT[::-1]], vocab_size=300)
    with pytest.raises(LlamalabError, match="do not share a tokenizer"):
        kl_divergence(model, tok, _model(other_tok), other_tok, [TEXT])


def test_distinct_and_repetition():
    seqs = [[1, 2, 1, 2], [3, 3, 3]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)  # (1,2) (2,1) (1,2) (3,3) (3,3)
    assert repeated_ngram_rate(seqs, 2) == pytest.approx(2 / 5)
    assert repeated_ngram_rate([[1, 2, 3, 4]], 1) == 0.0
    assert math.isnan(distinct_n([[1]], 2))


def test_generation_quality(tok, model):
    prompts = ["To be, or not", "The slings and", "Whether"]
    g = generation_quality(model, tok, prompts, max_new_tokens=12)
    assert g.prompts == 3 and 0 < g.mean_length <= 12 and len(g.samples) == 3
    assert 0 < g.distinct_1 <= 1 and 0 <= g.rep_2 <= 1
    assert g.reference == "self" and g.reference_perplexity > 1
    # greedy text scored by the model that produced it is likelier than under a different model
    other = generation_quality(model, tok, prompts, max_new_tokens=12, reference=_model(tok, seed=5), ref_tok=tok)
    assert other.reference_perplexity > g.reference_perplexity


def test_loglikelihood_and_encode_pair(tok, model):
    ctx, cont = encode_pair(tok, "To be, or not to be, ", "that is")
    assert tok.decode(cont).startswith(" ")  # the context's trailing space moved to the continuation
    assert tok.decode(ctx + cont) == "To be, or not to be, that is"
    s = loglikelihoods(model, tok, [("To be, or not to be, ", "that is"), ("", "To be")], batch_size=2)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids), -1)[0]
    manual = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
    assert s[0].logprob == pytest.approx(manual, rel=1e-5) and s[0].n_tokens == len(cont)
    assert s[1].n_tokens == len(tok.encode("To be", add_bos=False))


def test_shared_context_packing_equals_separate_scoring(tok, model):
    from llamalab.eval.multichoice import loglikelihoods_of_ids

    pairs = [encode_pair(tok, "To be, or not to be, that is the", c) for c in (" question", " answer:", " b")]
    pairs += [encode_pair(tok, "Whether 'tis nobler", " in the mind to suffer")]
    pairs += [encode_pair(tok, "To be, or not to be, that is the", " rub")]  # same context, out of order
    packed = loglikelihoods_of_ids(model, pairs, batch_size=2)
    alone = loglikelihoods_of_ids(model, pairs, batch_size=2, share_context=False)
    assert [s.n_tokens for s in packed] == [s.n_tokens for s in alone]
    assert [s.logprob for s in packed] == pytest.approx([s.logprob for s in alone], rel=1e-4)
    assert [s.is_greedy for s in packed] == [s.is_greedy for s in alone]


def test_multiple_choice_scoring(tok, model):
    items = [Item("To be, or not to be, that is the", (" question", " answer", " banana"), 0),
             Item("The slings and arrows of", (" fortune", " outrageous fortune"), 1)]
    res = multiple_choice(model, tok, items, n_boot=100)
    scores = loglikelihoods(model, tok, [(it.context, c) for it in items for c in it.choices])
    best0 = max(range(3), key=lambda j: scores[j].logprob)
    best1 = max(range(2), key=lambda j: scores[3 + j].logprob)
    assert res.acc == ((best0 == 0) + (best1 == 1)) / 2
    assert res.items == 2 and res.chance == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_bundled_tasks_load_and_rebuild():
    from llamalab.eval.tasks import build

    tasks = builtin_tasks()
    assert set(tasks) >= {"shakespeare_nextline", "tang_nextline", "python_nextline"}
    for name in tasks:
        _, items = load_task(name)
        assert len(items) == 100 and all(len(it.choices) == 4 for it in items)
        assert len({it.answer for it in items}) == 4  # the answer's position varies
        assert len({it.context for it in items}) == 100
    rebuilt = build(names=["tang_nextline"])["tang_nextline"]
    shipped = [json.loads(x) for x in tasks["tang_nextline"].read_text(encoding="utf-8").splitlines()]
    assert rebuilt == shipped


def test_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "answer": 0}\n')
    with pytest.raises(LlamalabError, match="at least 2 choices"):
        load_task(bad)
    bad.write_text("not json\n")
    with pytest.raises(LlamalabError, match="bad.jsonl:1"):
        load_task(bad)
    with pytest.raises(LlamalabError, match="no such task"):
        load_task(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------ lm-evaluation-harness adapter
class _Req:  # the request shape the harness passes: an object with an ``args`` tuple
    def __init__(self, *args):
        self.args = args


def test_harness_adapter_methods(tok, model):
    from llamalab.eval.harness import LlamalabLM

    lm = LlamalabLM(model, tok, batch_size=2, max_length=32)
    ll = lm.loglikelihood([_Req("To be, or not to be, ", "that is"), _Req("Whether", " 'tis nobler")])
    direct = loglikelihoods(model, tok, [("To be, or not to be, ", "that is"), ("Whether", " 'tis nobler")])
    assert [x[0] for x in ll] == pytest.approx([s.logprob for s in direct])
    assert all(isinstance(g, bool) for _, g in ll)
    # rolling: every token scored once after the prefix token, in windows of at most 32 tokens
    rolling = lm.loglikelihood_rolling([_Req(TEXT), _Req("Hello")])
    ids = [lm.prefix_token_id, *tok.encode(TEXT, add_bos=False)]
    assert len(ids) > 32
    nll = perplexity_of_ids(model, [ids], max_length=32, stride=31)  # strided, same targets, less context
    assert rolling[0] < 0 and rolling[0] == pytest.approx(-nll.cross_entropy * nll.tokens, rel=0.2)
    short = [lm.prefix_token_id, *tok.encode("Hello", add_bos=False)]
    logp = F.log_softmax(model(torch.tensor([short])), -1)[0]
    assert rolling[1] == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(short[1:])), rel=1e-5)
    # generation stops at the `until` strings and honours max_gen_toks
    from llamalab.generation.generate import generate

    full = generate(model, tok, "To be", max_new_tokens=12, temperature=0.0)
    stop = full[4:6]
    assert len(full) >= 6 and stop
    outs = lm.generate_until([_Req("To be", {"until": [stop], "max_gen_toks": 12}),
                              _Req("To be", {"until": ["\x01never"], "max_gen_toks": 3})])
    assert outs[0] == full.split(stop)[0]
    assert outs[1] == generate(model, tok, "To be", max_new_tokens=3, temperature=0.0)


def test_harness_runs_a_local_task(tok, model):
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")
    from llamalab.eval.harness import LlamalabLM, run_tasks

    lm = LlamalabLM(model, tok, batch_size=8)
    res = run_tasks(lm, ["llamalab_shakespeare_nextline"], limit=6)
    metrics = res["results"]["llamalab_shakespeare_nextline"]
    _, items = load_task("shakespeare_nextline")
    ours = multiple_choice(model, tok, items[:6], n_boot=0)
    assert metrics["acc,none"] == pytest.approx(ours.acc)
    assert metrics["acc_norm,none"] == pytest.approx(ours.acc_norm)  # ASCII: characters = bytes
    with pytest.raises(LlamalabError, match="unknown harness task"):
        run_tasks(lm, ["llamalab_no_such_task"])
