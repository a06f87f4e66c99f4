"""The weather LDM's text encoder: the project's CLIP text encoder and tokenizer (synth/text_encoder.py), frozen.

    ids = CLIPTokenizer(caption)  (BPE trained offline on synth.text_encoder.corpus(), padded to 77 with EOS)
    T(c) = CLIPTextModel(ids).last_hidden_state  [B, 77, D],  D = the UNet's cross_attention_dim

Frozen, as in Stable Diffusion, and for three reasons here: (1) a random frozen CLIP already gives every caption
its own embedding (different tokens, and with causal attention every padding position after the caption sees
the whole caption), and the UNet's cross-attention key/value projections are trained, so they can learn to
read any fixed, distinct embeddings; (2) the shipped text encoder is then exactly `text_model(tokenizer,
seed)` rounded to fp16 (`build_weather_text`), reproducible from code, and the embeddings the UNet trained on
are bit-identical to what `synth.sd.load_sd` computes from the shipped fp16 weights; (3) the prompt encoder of
stage 1 builds its prompts around the empty-text embedding, which stays the one the UNet learned as the
unconditional model (caption dropout to ""). Training caches T(c) per caption: five captions in all
("", "a photo" and the three weather captions), so a step costs no text-encoder forward.
"""

from __future__ import annotations

from typing import Any

import torch
from d4ir.synth.text_encoder import text_model, tiny_tokenizer

TEXT_DIM = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4


class WeatherText:
    """Captions -> frozen CLIP hidden states [B, 77, D], cached per caption.

    Args:
        model: a `transformers.CLIPTextModel` (frozen here).
        tokenizer: its `CLIPTokenizer`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def parameters(self):
        """No trainable parameters: the encoder is frozen."""
        return iter(())

    @torch.no_grad()
    def _one(self, text: str) -> torch.Tensor:
        if text not in self._cache:
            ids = self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._cache[text] = self.model(input_ids=ids).last_hidden_state[0].float()  # [77, D]
        return self._cache[text]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[B, 77, D] float32 (no gradient: nothing here trains)."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings")
        return torch.stack([self._one(t) for t in texts])


def build_weather_text(hidden: int = TEXT_DIM, layers: int = TEXT_LAYERS, heads: int = TEXT_HEADS,
                       seed: int = 0) -> WeatherText:
    """The project's tiny CLIP tokenizer and a `CLIPTextModel` of width `hidden` with fixed-seed weights, rounded
    to float16 (the dtype it ships in) so that training and the shipped model see the same embeddings.

    Args:
        hidden: D (the UNet's cross_attention_dim); a multiple of `heads`.
        layers, heads: transformer depth and attention heads; the MLP is 2 D wide.
        seed: weight seed.
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
    tokenizer = tiny_tokenizer()
    model = text_model(tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=2 * hidden, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return WeatherText(model, tokenizer)
