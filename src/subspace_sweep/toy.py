"""A tiny offline Qwen3 and its tokenizer, for tests and benchmarks without a model hub.

The model has the structure the sweep relies on (GQA with ``n_kv < n_heads`` and
``head_dim > 1``, q/k norms, SwiGLU MLP with ``d_mlp = 3 d``, tied embeddings) at a size
that builds in milliseconds. Its weights are a pure function of ``seed``. Every RMSNorm gain
(input, pre-MLP, final, q_norm, k_norm) is drawn per channel as ``exp(N(0, GAIN_LOG_STD²))``:
with all gains 1 (transformers' initialisation) a formula that forgets a gain would pass every
test (SPEC §4.1).

The tokenizer is a byte-level BPE trained offline on the package's probe and persona texts,
wrapped as a transformers fast tokenizer with Qwen's special tokens and a Qwen-style chat
template (``<|im_start|>role\\n...<|im_end|>\\n``; generation prompt ``<|im_start|>assistant\\n``).
Like Qwen, it adds no special tokens to raw text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .prompts import load_probe_set, persona_texts

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
VOCAB_SIZE = 512
#: Log-standard deviation of the toy's norm gains (see the module docstring).
GAIN_LOG_STD = 0.3
#: A vocabulary large enough that every word of the corpus becomes one token, as in Qwen's
#: 151k-token BPE: ~19 tokens per raw probe and ~55 per chat-formatted persona probe (the
#: 512-token default gives ~28 and ~88). Benchmarks use it for realistic prompt lengths.
WORD_LEVEL_VOCAB_SIZE = 4096

# Qwen's template without tools/thinking: one block per message, optional generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    probes = load_probe_set()
    pos, neg = persona_texts()
    chat_bits = ["system\n", "user\n", "assistant\n", "Yes", "No", "Yes.", "No."]
    # A fixed order from the shipped data: the same corpus gives the same merges.
    return [*probes.prompts, *probes.claims, *pos, *neg, *chat_bits]


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocab_size: int) -> str:
    # Cached as JSON (immutable), so each caller gets an independent tokenizer object:
    # a test that flips padding_side must not leak into another test.
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer (pad = bos = ``<|endoftext|>``, eos = ``<|im_end|>``), right padding.

    ``vocab_size`` caps the BPE vocabulary (``WORD_LEVEL_VOCAB_SIZE``: Qwen-like token counts)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(
    seed: int = 0,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    d_mlp: int = 192,
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """A new seeded tiny Qwen3 (float32, eval mode, eager attention, no grads) and its tokenizer."""
    tok = build_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Larger than Qwen's 0.02 so that the tiny model's activations and attention
        # patterns are far from degenerate (tests compare them).
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # No pad_token_id, like Qwen3-0.6B's config: nn.Embedding would zero the padding row, and
        # the pad token doubles as bos here, whose embedding attention_sink needs.
        pad_token_id=None,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    # Fork the global RNG: building a toy must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        randomise_norm_gains(model, seed)
    model.set_attn_implementation("eager")
    model.to(torch.float32).eval()
    model.requires_grad_(False)
    return model, tok


#: Per supported model_type (``arch.ARCHITECTURES``), the config options a tiny random model of it
#: needs beyond the shared shape; ``bias`` rows turn on every bias the architecture can have.
TINY_DECODER_OPTIONS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases always
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": {},
    "olmo2": {},
    "phi3": {},
}
BIAS_OPTIONS: dict[str, dict] = {"llama": dict(attention_bias=True, mlp_bias=True)}


def build_tiny_decoder(
    model_type: str, seed: int = 0, *, bias: bool = False, n_layers: int = 3, d_model: int = 64, n_heads: int = 4,
    n_kv_heads: int = 2, head_dim: int = 16, d_mlp: int = 96,
):
    """A seeded tiny random model of any supported ``model_type`` (float32, eval, eager attention,
    non-trivial norm gains) and the offline tokenizer: the same shape for every architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import architecture_of

    tok = build_tiny_tokenizer()
    options = {**TINY_DECODER_OPTIONS.get(model_type, {}), **(BIAS_OPTIONS.get(model_type, {}) if bias else {})}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim, max_position_embeddings=512,
        initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        use_cache=False, **options,
    )
    architecture_of(config)  # only table rows
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        randomise_norm_gains(model, seed)
        if bias:  # transformers initialises biases to 0: make them count
            gen = torch.Generator().manual_seed(int(seed) + 104729)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(".bias"):
                        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.set_attn_implementation("eager")
    model.to(torch.float32).eval()
    model.requires_grad_(False)
    return model, tok


def save_tiny_decoder(path: str | Path, model_type: str, seed: int = 0, **kwargs) -> Path:
    """``build_tiny_decoder`` saved as a model folder (config, weights, tokenizer)."""
    path = Path(path)
    model, tok = build_tiny_decoder(model_type, seed, **kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def randomise_norm_gains(model: torch.nn.Module, seed: int, log_std: float = GAIN_LOG_STD) -> None:
    """Set every RMSNorm gain of ``model`` to seeded ``exp(N(0, log_std²))`` per channel, in
    module order (a pure function of ``seed`` and the architecture)."""
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    with torch.no_grad():
        for _, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                w = module.weight
                w.copy_(torch.exp(log_std * torch.randn(w.shape, generator=gen, dtype=torch.float32)).to(w.dtype))


def save_tiny_model(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny model + tokenizer to ``path`` (loadable by ``AutoModelForCausalLM/AutoTokenizer``)."""
    path = Path(path)
    model, tok = build_tiny_model(seed, **kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plant_outlier_gains(model: torch.nn.Module, coordinates: Sequence[int], factor: float = 300.0) -> None:
    """Multiply the writers' post-projection norm gains of every layer by ``factor`` on
    ``coordinates`` (SPEC §6 concern 14: the handful of huge gains real post-norm models have in
    front of the residual writers). The new gain is read back from the norm's own forward
    (``model.norm_gain``), whatever the module stores (``weight`` or ``1 + weight``)."""
    from .arch import architecture_of
    from .model import block_name, norm_gain

    arch = architecture_of(model.config)
    d = int(model.config.hidden_size)
    paths = [p for w in ("o_proj", "down_proj") if (p := arch.write_norm(w)) is not None]
    if not paths:
        raise ValueError(f"{arch.model_type}: its writers add to the residual directly; no post-norm gain to plant")
    idx = torch.as_tensor(list(coordinates), dtype=torch.long)
    with torch.no_grad():
        for layer in range(int(model.config.num_hidden_layers)):
            for path in paths:
                norm = model.get_submodule(f"{block_name(layer)}.{path}")
                gain = norm_gain(norm, d)
                offset = gain - norm.weight.float().cpu()  # 0 (Llama/Qwen) or 1 (Gemma)
                norm.weight[idx] = (factor * gain[idx] - offset[idx]).to(norm.weight.dtype)
