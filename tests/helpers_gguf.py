"""A tiny GGUF file written from the toy Llama and its tokenizer (gguf's own writer), so that the
GGUF path (conversion, cache, bad files) is tested in the fast tier without the 98 MB real model.

The tensors are written as llama.cpp's converter writes them: GGUF names, q/k rows permuted for
its RoPE layout (transformers' reader undoes it), float32 (``ALL_F32``). The tokenizer is the
toy's byte-level BPE as a ``gpt2`` GGUF vocabulary (tokens, types, merges) with its chat template.
``write_tiny_gguf`` is checked by a test: the GGUF load's logits equal the toy's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``permute`` (half-split RoPE rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | Path, seed: int = 0, *, architecture: str = "llama", truncate_to: int | None = None,
                    chat_template: bool = True):
    """Write the tiny Llama of ``seed`` as a GGUF file; returns (path, model, tokenizer).

    ``architecture`` is written as ``general.architecture`` (e.g. ``"gpt2"`` for a foreign file,
    whose tensors are then still Llama's). ``truncate_to`` cuts the file to that many bytes.
    ``chat_template=False`` leaves the template out (a base model's GGUF)."""
    import gguf

    from subspace_sweep.toy import build_tiny_decoder

    model, tok = build_tiny_decoder("llama", seed=seed)
    cfg = model.config
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch=architecture)
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size and [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    if chat_template:
        w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif name == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:  # a GGUF without output.weight is read as tied
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_to is not None:
        data = path.read_bytes()
        path.write_bytes(data[:truncate_to])
    return path, model, tok


# ----------------------------------------------------------------------------- a known model in pieces


def fake_part_packages(site: Path, gguf_path: Path, name: str = "tiny-in-pieces", n_parts: int = 4):
    """Data packages like Gemma-3-270m's (issue 31) holding ``gguf_path`` in ``n_parts`` pieces,
    installed as dist-info folders in ``site``: ``fake-gguf`` (data/SHA256SUMS) and
    ``fake-gguf-part1..n`` (data/<file>.partNN). Pieces 1..n-1 are the same size (so two can be
    swapped), the last shorter. Returns the KnownModel (its pins computed from the file)."""
    import hashlib

    from subspace_sweep.gguf_models import DataPart, KnownModel

    data = gguf_path.read_bytes()
    step = len(data) // n_parts + 1  # the last piece shorter than the others
    pieces = [data[i * step:(i + 1) * step] for i in range(n_parts)]
    assert len(pieces[-1]) < step and all(pieces)
    file = "tiny.gguf"

    def package(dist: str, files: dict[str, bytes]) -> None:
        module = dist.replace("-", "_")
        info = site / f"{module}-1.0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n")
        for rel, blob in files.items():
            (site / module / "data").mkdir(parents=True, exist_ok=True)
            (site / module / "data" / rel).write_bytes(blob)

    sha = hashlib.sha256(data).hexdigest()
    package("fake-gguf", {"SHA256SUMS": f"{sha}  {file}\n".encode()})
    parts = []
    for i, piece in enumerate(pieces):
        dist = f"fake-gguf-part{i + 1}"
        package(dist, {f"{file}.part{i:02d}": piece})
        parts.append(DataPart(dist, f"{dist.replace('-', '_')}/data/{file}.part{i:02d}", len(piece),
                              hashlib.sha256(piece).hexdigest()))
    return KnownModel(name, "fake-gguf", file, parts=tuple(parts), sha256=sha, sums="fake_gguf/data/SHA256SUMS")


def install_fake_packages(monkeypatch, site: Path, known) -> None:
    """Make ``importlib.metadata.distribution`` find the fake packages of ``site`` (a package whose
    dist-info folder is gone is not installed) and ``known`` a known model name."""
    from importlib import metadata

    from subspace_sweep import gguf_models

    real = metadata.distribution

    def distribution(dist: str):
        if not dist.startswith("fake-gguf"):
            return real(dist)
        info = site / f"{dist.replace('-', '_')}-1.0.0.dist-info"
        if not info.is_dir():
            raise metadata.PackageNotFoundError(dist)
        return metadata.PathDistribution(info)

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setitem(gguf_models.KNOWN_MODELS, known.name, known)
