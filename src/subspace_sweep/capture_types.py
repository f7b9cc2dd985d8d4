"""What the captures hand to the rest of the sweep (SPEC §3). All float32, CPU.

A-side and B-side captures are separate types so that a candidate builder's signature
cannot receive anything computed with the LoRA delta.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .errors import InputError


@dataclass(frozen=True)
class ActivationCaptures:
    """A-side captures on the FIT prompts (L layers, n FIT prompts, width d)."""

    clean: Tensor  # (L, n, d) block outputs at the last real token, raw probe text
    persona_pos: Tensor  # (L, n, d) block outputs, chat template, system = persona+
    persona_neg: Tensor  # (L, n, d) same with persona-
    up_in_clean: Tensor  # (L, n, d) input of mlp.up_proj (post-attention RMSNorm output), raw text
    up_in_pos: Tensor  # (L, n, d) same under persona+
    up_in_neg: Tensor  # (L, n, d) same under persona-
    up_written_pos: Tensor  # (L, n, d) output of mlp.up_proj mapped back by W_down^T (x_up @ W_down^T), persona+
    up_written_neg: Tensor  # (L, n, d) same under persona-
    tokens_pos: Tensor  # (L_tok, n, T, d) block outputs at every position, persona+, right-aligned (zeros = padding)
    tokens_neg: Tensor  # (L_tok, n, T, d) same for persona-, same T
    attn_pos: Tensor  # (L_tok, n, T) final token's attention (mean over heads) to each position, right-aligned
    attn_neg: Tensor  # (L_tok, n, T)
    sink: Tensor  # (L, d) the sink token alone (position 0) as each layer reads it: its attention norm's output
    #: The layers the token-level captures (tokens_*, attn_*) hold, in order (L_tok of them); None:
    #: every layer. They are the largest captures (0.7 GB at Qwen3-4B shapes for all 36 layers) and
    #: only the attention-selected bases of the scored layers read them (issue 26).
    token_layers: tuple[int, ...] | None = None

    @property
    def n_layers(self) -> int:
        return int(self.clean.shape[0])

    def token_index(self, layer: int) -> int:
        """The row of ``tokens_*`` / ``attn_*`` that holds ``layer``; InputError when not captured."""
        if self.token_layers is None:
            return layer
        try:
            return self.token_layers.index(layer)
        except ValueError:
            raise InputError(f"the token-level captures hold layers {list(self.token_layers)}, not layer {layer}") from None

    def release_tokens(self) -> None:
        """Free the token-level captures' memory (their tensors become empty): once the attention-
        selected bases are built nothing else reads them, and the weight Grams come next."""
        for t in (self.tokens_pos, self.tokens_neg, self.attn_pos, self.attn_neg):
            t.set_()


@dataclass(frozen=True)
class SteeredLabels:
    """B-side label: block output with alpha=+1 minus with alpha=-1, last real token, raw text."""

    eval: Tensor  # (L, n_eval, d) the label the sweep scores (--label)
    fit: Tensor  # (L, n_fit, d)
    eval_cumulative: Tensor | None = None  # (L, n_eval, d) block output change (the scope diagnostic)
    eval_local: Tensor | None = None  # (L, n_eval, d) change of (block output − block input)
    eval_midpoint: Tensor | None = None  # (L, n_eval, d) (h(α=+1) + h(α=−1))/2: the unsteered residual to first order
