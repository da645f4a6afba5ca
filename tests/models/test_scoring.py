"""Log-likelihood scoring: the numbers of a plain full forward pass, whatever the batching,
the shared-context shortcut or the truncation; lm-eval's rolling windows; greedy
generation equal to the model's own."""

import random

import pytest
import sentencepiece as spm
import torch
from torch.nn import functional as F

from models.llama import Llama, ModelConfig
from models.scoring import (
    encode_pair,
    greedy_until,
    loglikelihood,
    loglikelihood_rolling,
    rolling_windows,
    score_tokens,
)
from tasks.shards import write_records
from tasks.tokenize import TokenizeConfig, tokenize_corpus

WINDOW = 24
WORDS = ["json", "socket", "path", "module", "def", "class", "return", "load", "dump"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: one thread is fastest, and never fights other work for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    rng = random.Random(0)
    records = [{"id": f"d{i}", "url": f"http://x/{i}",
                "text": " ".join(rng.choice(WORDS) for _ in range(40))}
               for i in range(40)]
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300), root / "corpus", root / "tokens")
    return spm.SentencePieceProcessor(model_file=str(root / "tokens" / "tokenizer.model"))


def make_model(sp, prompt_tokens=0, causal=True, seed=0):
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=sp.get_piece_size(), d_model=32, n_layers=2,
                              n_heads=4, context_length=WINDOW + prompt_tokens,
                              prompt_tokens=prompt_tokens, causal=causal))
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy is clear-cut
        model.embed.weight.mul_(20)
    return model.eval()


@torch.no_grad()
def naive(model, sp, context, continuation):
    """Sum log p over the continuation from one forward pass over the whole sequence."""
    context_ids, continuation_ids = encode_pair(sp, context, continuation)
    full = [sp.eos_id(), *context_ids, *continuation_ids][-(model.max_tokens + 1):]
    log_probs = F.log_softmax(model(torch.tensor([full[:-1]]))[0][0], dim=-1)
    n = len(continuation_ids)
    positions = range(len(full) - 1 - n, len(full) - 1)
    return (sum(log_probs[t, full[t + 1]].item() for t in positions),
            all(log_probs[t].argmax().item() == full[t + 1] for t in positions))


def requests(seed=1):
    rng = random.Random(seed)
    out = []
    for length in (0, 1, 3, 8, 40):  # 40 words do not fit the window: the start is cut
        context = " ".join(rng.choice(WORDS) for _ in range(length))
        for choice in (" json", " socket path", " return load dump"):
            out.append((context, choice))  # the choices of one question share the context
    out += [("load ", "dump"), ("class json", " module")]  # a trailing space moves on
    return out


@pytest.mark.parametrize("prompt_tokens", [0, 3])
def test_loglikelihood_matches_a_full_forward_pass(sp, prompt_tokens):
    model = make_model(sp, prompt_tokens)
    reqs = requests()
    got = loglikelihood(model, sp, reqs, batch_size=4)
    for request, (lp, greedy) in zip(reqs, got, strict=True):
        expected_lp, expected_greedy = naive(model, sp, *request)
        assert lp == pytest.approx(expected_lp, abs=1e-4), request
        assert greedy == expected_greedy
        assert lp < 0


def test_results_do_not_depend_on_order_or_batch_size(sp):
    model = make_model(sp)
    reqs = requests()
    reference = loglikelihood(model, sp, reqs, batch_size=16)
    order = list(range(len(reqs)))
    random.Random(3).shuffle(order)
    shuffled = loglikelihood(model, sp, [reqs[i] for i in order], batch_size=1)
    for position, i in enumerate(order):
        assert shuffled[position][0] == pytest.approx(reference[i][0], abs=1e-4)
        assert shuffled[position][1] == reference[i][1]


def test_a_greedy_continuation_is_flagged_greedy(sp):
    model = make_model(sp)
    context = "json socket"
    prompt = torch.tensor([[sp.eos_id(), *sp.encode(context)]])
    greedy_ids = model.generate(prompt, 4, temperature=0)[0, prompt.size(1):].tolist()
    (lp, greedy), = score_tokens(model, [(prompt[0].tolist(), greedy_ids)])
    assert greedy
    other = [(greedy_ids[0] + 1) % sp.get_piece_size(), *greedy_ids[1:]]
    (other_lp, other_greedy), = score_tokens(model, [(prompt[0].tolist(), other)])
    assert not other_greedy and other_lp < lp
    assert loglikelihood(model, sp, [(context, "")]) == [(0.0, True)]


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for length in (1, 5, 24, 25, 47, 48, 49, 100):
        tokens = list(range(10, 10 + length))
        expected = [make_disjoint_window(w) for w in
                    get_rolling_token_windows(tokens, 2, WINDOW, context_len=1)]
        assert rolling_windows(tokens, 2, WINDOW) == expected
        predicted = [t for _, continuation in rolling_windows(tokens, 2, WINDOW)
                     for t in continuation]
        assert predicted == tokens  # every token once


def test_rolling_loglikelihood_sums_its_windows(sp):
    model = make_model(sp)
    short = "json socket path"
    long_text = " ".join(random.Random(4).choice(WORDS) for _ in range(60))
    assert len(sp.encode(long_text)) > 2 * WINDOW
    rolled = loglikelihood_rolling(model, sp, [short, long_text], batch_size=3)
    assert rolled[0] == pytest.approx(loglikelihood(model, sp, [("", short)])[0][0], abs=1e-4)
    windows = rolling_windows(sp.encode(long_text), sp.eos_id(), WINDOW)
    expected = 0.0
    with torch.no_grad():
        for context, continuation in windows:
            full = [*context, *continuation]
            log_probs = F.log_softmax(model(torch.tensor([full[:-1]]))[0][0], dim=-1)
            n = len(continuation)
            expected += sum(log_probs[t, full[t + 1]].item()
                            for t in range(len(full) - 1 - n, len(full) - 1))
    assert rolled[1] == pytest.approx(expected, abs=1e-3)


def test_greedy_until_is_the_models_greedy_generation(sp):
    model = make_model(sp)
    contexts = ["json", "socket path", "def load", "json"]
    budgets = [6, 6, 3, 6]
    got = greedy_until(model, sp, [(c, [], b) for c, b in zip(contexts, budgets, strict=True)],
                       batch_size=2)
    for context, budget, text in zip(contexts, budgets, got, strict=True):
        prompt = torch.tensor([[sp.eos_id(), *sp.encode(context)]])
        out = model.generate(prompt, budget, temperature=0, stop_token=sp.eos_id())
        ids = out[0, prompt.size(1):].tolist()
        ids = ids[:ids.index(sp.eos_id())] if sp.eos_id() in ids else ids
        assert text == sp.decode(ids)
    assert got[0] == got[3]
    text = got[1]
    assert len(text) >= 6
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a stop string ends the text before it
    cut, = greedy_until(model, sp, [(contexts[1], ["never there", stop], 6)])
    assert cut == text.split(stop)[0] and len(cut) < len(text)


def test_bad_requests_are_refused(sp):
    with pytest.raises(ValueError, match="masked-LM encoder"):
        loglikelihood(make_model(sp, causal=False), sp, [("a", " b")])
    with pytest.raises(ValueError, match="more than the model's window"):
        score_tokens(make_model(sp), [([2], list(range(5, 5 + WINDOW + 1)))])
