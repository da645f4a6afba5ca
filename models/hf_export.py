"""Export a trained model to Hugging Face transformers' format.

The decoder is a Llama (pre-norm RMSNorm blocks, rotary embeddings, grouped-query
attention, SwiGLU), so it maps onto ``LlamaForCausalLM`` weight for weight. Two things
differ only in layout:

* forgeline fuses projections: ``kv_proj`` holds the key rows then the value rows, and
  ``gate_up`` the gate rows then the up rows; they are split.
* forgeline's rotary embedding turns interleaved feature pairs (0, 1), (2, 3), ... of
  each head, transformers' turns the pairs (i, i + head_dim/2). Reordering the rows of
  the query and key projections of every head (even features first, then odd ones) makes
  the two the same function: attention scores are unchanged because queries and keys are
  permuted alike.

The sentencepiece tokenizer becomes a ``tokenizers`` tokenizer built from the model's own
settings (transformers' ``SpmConverter``), saved as ``tokenizer.json``, so transformers
loads it offline with ``AutoTokenizer`` and encodes exactly as sentencepiece does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.checkpoint import load_model
from models.llama import Llama

# the sentencepiece ids every forgeline tokenizer is trained with (tasks/tokenize.py)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>"}


def _halves_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns each head's interleaved rotary pairs into split halves."""
    per_head = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return torch.cat([per_head + h * head_dim for h in range(n_heads)])


def hf_config(model: Llama, special_ids: dict[str, int]):
    from transformers import LlamaConfig

    c = model.config
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", attention_dropout=0.0,
        bos_token_id=special_ids["bos"], eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"], torch_dtype="float32")


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM's names and layout."""
    c = model.config
    q_order = _halves_order(c.n_heads, c.head_dim)
    k_order = _halves_order(c.n_kv_heads, c.head_dim)
    kv_rows = c.n_kv_heads * c.head_dim
    state = {"model.embed_tokens.weight": model.embed.weight,
             "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        k, v = block.attn.kv_proj.weight.split(kv_rows)
        gate, up = block.mlp.gate_up.weight.split(c.mlp_hidden)
        state.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": block.attn.q_proj.weight[q_order],
            p + "self_attn.k_proj.weight": k[k_order],
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.out_proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
        })
    if not c.tie_embeddings:
        state["lm_head.weight"] = model.head.weight
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone()
            for name, t in state.items()}


def hf_tokenizer(tokenizer_model: Path):
    """The sentencepiece model as a transformers fast tokenizer with the same ids."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    if proto.trainer_spec.model_type == 2:  # BPE: pieces by id, merges ranked by score
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:  # unigram: pieces with their scores
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ValueError(f"{tokenizer_model}: sentencepiece model type "
                         f"{proto.trainer_spec.model_type} cannot be converted")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS,
                                   model_max_length=None, clean_up_tokenization_spaces=False)


def export_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model_dir``'s model.pt and tokenizer.model to ``out_dir`` as a transformers
    model (config.json, model.safetensors, generation_config.json, tokenizer files)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for name in ("model.pt", "tokenizer.model"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir} holds no {name}: export needs a trained "
                                    "model's directory (the pretrain or finetune stage output)")
    model = load_model(model_dir / "model.pt")
    if not model.config.causal or model.config.prompt_tokens:
        raise ValueError(f"{model_dir} holds a "
                         + ("masked-LM encoder" if not model.config.causal else
                            "prompt-tuned model (a soft prompt)")
                         + ", which transformers' LlamaForCausalLM cannot represent; export "
                           "a causal model without prompt tuning (LoRA adapters are merged)")
    tokenizer = hf_tokenizer(model_dir / "tokenizer.model")
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "pad": tokenizer.pad_token_id}
    config = hf_config(model, ids)
    with torch.device("meta"):  # no random initialisation: every weight comes from ours
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(hf_state_dict(model), strict=not config.tie_word_embeddings,
                             assign=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model.eval()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {}
    if (model_dir / "config.json").is_file():
        source = json.loads((model_dir / "config.json").read_text())
    card = ["# forgeline model", "",
            (f"A {model.num_params() / 1e6:.2f}M-parameter Llama-style decoder trained by "
             "forgeline, exported for `transformers`:"), "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{out_dir}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")', "```", "",
            ("Documents were separated by the end-of-text token `</s>` in training: start a "
             "prompt with it to begin a new document."), ""]
    if source:
        card += ["Training settings:", "", "```json",
                 json.dumps({k: source[k] for k in ("model", "training") if k in source},
                            indent=2), "```", ""]
    (out_dir / "README.md").write_text("\n".join(card), encoding="utf-8")
    return out_dir
