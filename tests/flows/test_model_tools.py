"""The model outside the pipeline: the transformers export (same logits, same tokens,
``generate`` works) and ``forgeline export`` / ``forgeline generate``."""

import random

import pytest
import sentencepiece as spm
import torch

from flows.cli import main
from models.checkpoint import load_model, save_model
from models.generation import load_generator
from models.hf_export import export_model
from models.llama import Llama, ModelConfig
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.tokenize import TokenizeConfig, tokenize_corpus

TEXTS = ["import json\n\ndef load(path):\n    return json.loads(open(path).read())\n",
         "  leading spaces, tabs\tand   runs of spaces  ", "", " ", "a\nb\n\n",
         "digits 1234567 and unicode: naïve café, 漢字, emoji 🙂", "x" * 300]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on code-like text, and its tokenizer."""
    root = tmp_path_factory.mktemp("model")
    rng = random.Random(0)
    names = ["path", "data", "value", "items", "config", "buffer", "socket", "reader",
             "writer", "parser", "table", "record", "stream", "handle", "cursor"]
    records = [{"id": f"d{i}", "url": f"http://x/{i}", "text": "\n".join(
        f"def read_{rng.choice(names)}({rng.choice(names)}, {rng.choice(names)}={n}):\n"
        f"    # Return the {rng.choice(names)} of the {rng.choice(names)}.\n"
        f"    return {rng.choice(names)}.get({rng.randint(0, 999)}) + {rng.choice(names)}\n"
        for n in range(10))} for i in range(80)]
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=320, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    config = PretrainConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            context_length=32, batch_size=8, max_steps=40, warmup_steps=5,
                            val_every_steps=40, val_batches=1, checkpoint_every_steps=20)
    pretrain(config, root / "tokens", root / "pretrain")
    return root / "pretrain"


def test_export_gives_the_native_logits_and_tokens(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_model(trained, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    for text in TEXTS:  # the same ids as sentencepiece, and back to the same text
        ids = sp.encode(text)
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == ids, text
        assert hf_tokenizer.decode(ids) == sp.decode(ids)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id) == (sp.eos_id(), sp.bos_id())

    native = load_model(trained / "model.pt")
    idx = torch.tensor([[sp.eos_id(), *sp.encode(TEXTS[0])][:32]])
    with torch.no_grad():
        expected, got = native(idx)[0], hf_model(idx).logits
    assert (expected - got).abs().max().item() < 1e-4
    # transformers' own generate, greedy, continues as the native model does
    prompt = torch.tensor([[sp.eos_id(), *sp.encode("def read_")]])
    hf_out = hf_model.generate(prompt, max_new_tokens=12, do_sample=False,
                               pad_token_id=sp.pad_id())
    assert torch.equal(hf_out[0], native.generate(prompt, 12, temperature=0)[0][:hf_out.size(1)])


def test_export_of_an_untied_wide_head_model(trained, tmp_path):
    """Untied head, plain multi-head attention and a non-default rope theta map too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = Llama(ModelConfig(vocab_size=320, context_length=24, d_model=48, n_layers=3,
                              n_heads=6, tie_embeddings=False, rope_theta=500.0))
    src = tmp_path / "src"
    save_model(src / "model.pt", model)
    (src / "tokenizer.model").write_bytes((trained / "tokenizer.model").read_bytes())
    hf_model = AutoModelForCausalLM.from_pretrained(export_model(src, tmp_path / "hf"),
                                                    local_files_only=True).eval()
    idx = torch.randint(0, 320, (3, 24))
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4


def test_export_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model.pt"):
        export_model(tmp_path, tmp_path / "out")


def test_generate_command_from_a_stage_output_a_checkpoint_and_an_export(trained, tmp_path,
                                                                        capsys):
    expected = load_generator(trained, "cpu").generate("def read_", max_new_tokens=10,
                                                        temperature=0)
    assert expected  # the model says something
    export_model(trained, tmp_path / "hf")
    checkpoint = trained / "checkpoints" / "best.ckpt"
    for model in (trained, trained / "model.pt", tmp_path / "hf"):
        assert main(["generate", "--model", str(model), "--prompt", "def read_",
                     "--max-new-tokens", "10", "--temperature", "0", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == expected + "\n", model
    # the best checkpoint is the model at its best validation, here the last step's
    assert main(["generate", "--model", str(checkpoint), "--prompt", "def read_",
                 "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # sampling is repeatable with a seed, and differs from greedy at a high temperature
    args = ["generate", "--model", str(trained), "--prompt", "def", "--max-new-tokens", "20",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_and_export_name_what_is_wrong(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x",
                 "--workdir", str(tmp_path)]) == 2
    assert "not a directory, MLflow run id or model URI" in capsys.readouterr().err
    assert main(["generate", "--model", "x", "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--out", str(tmp_path / "out"), "--workdir", str(empty)]) == 2
    assert "no pipeline has run in this work directory" in capsys.readouterr().err
