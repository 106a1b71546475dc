"""A cross-attention cure: Ren et al.'s inference-time mitigation (ECCV 2024), the start
token's cross-attention logits scaled up and the summary tokens masked."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffmem.mitigate.base import Cure, CureContext, refuse
from diffmem.mitigate.prompt import text_unet
from diffmem.models import ModelScore


class AttentionRescale(Cure):
    """Ren et al. (ECCV 2024), inference-time mitigation: in every cross-attention layer of
    the UNet the logits of the start token are multiplied by ``C``,

        a_i = softmax_j(l_ij),  l_i0 <- C l_i0,

    shifting attention onto the start token and away from the prompt's trigger tokens, and
    the summary tokens (the end token and the padding after it, which carry the whole
    prompt in CLIP's encoding) are masked from the prompts' rows (the negative prompt's row
    keeps them: it is the guidance's reference). ``C`` in ``[1, 2]`` (Ren et al. use
    1.1-1.25); ``C = 1`` only masks. Attention slicing is not applied to the cured layers."""

    name: ClassVar[str] = "attention-rescale"
    low: ClassVar[float] = 1.0
    high: ClassVar[float] = 2.0
    grid: ClassVar[tuple[float, ...]] = (1.1, 1.15, 1.2, 1.25)
    meaning: ClassVar[str] = "the factor C in [1, 2] of the start token's cross-attention " \
        "logits"

    def check(self, model: ModelScore, ctx: CureContext) -> None:
        if not text_unet(model, "with_mask", "end_token"):
            raise refuse(self, "the cross-attention of a UNet text-to-image pipeline "
                         "(Stable Diffusion 1.x/2.x, SDXL: --prompts)", model)

    def prepare(self, model: ModelScore, ctx: CureContext) -> ModelScore:
        net = model.network
        assert net is not None
        masked = net["with_mask"](summary_mask(net["tokenize"](net["texts"]), net["end_token"]),
                                  model)
        unet = net["unet"]
        processors = {name: Rescaled(proc, float(self.strength)) if ".attn2." in name
                      else proc for name, proc in unet.attn_processors.items()}
        return with_processors(masked, unet, processors)


def summary_mask(ids: Tensor, end: int) -> Tensor:
    """``(n + 1, seq)``: 1 for the tokens before each prompt's first end token, 0 from it on
    (the summary tokens); a last row of ones for the negative prompt."""
    seq = ids.shape[1]
    is_end = ids == end
    first = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(
        ids[:, 0], seq))
    keep = (torch.arange(seq)[None] < first[:, None].clamp_min(1)).to(torch.float32)
    return torch.cat([keep, torch.ones(1, seq)])


class Rescaled:
    """A cross-attention processor: ``softmax(l + bias)`` with the start token's logit
    ``l_i0`` scaled by ``C`` (:class:`AttentionRescale`); ``bias`` is the network's
    attention mask (``-10000`` on masked tokens). Self-attention calls go to ``base``."""

    def __init__(self, base: Any, factor: float) -> None:
        self.base, self.factor = base, factor

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor |
                 None = None, attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is None:  # self-attention: unchanged
            return self.base(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, n, _ = hidden_states.shape
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
            else encoder_hidden_states
        h = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // h
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # (b, h, n, seq)
        start = logits[..., :1] * self.factor
        logits = torch.cat([start, logits[..., 1:]], dim=-1)
        if attention_mask is not None:  # (b, 1, seq) additive, from encoder_attention_mask
            logits = logits + attention_mask.reshape(b, 1, 1, -1).to(logits.dtype)
        out = (logits.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, n, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def with_processors(model: ModelScore, unet: Any, processors: dict[str, Any]) -> ModelScore:
    """``model`` whose every network call runs with ``processors`` set on ``unet`` (the
    previous ones restored after the call: the uncured model is untouched)."""

    before = unet.attn_processors  # the model's own, restored after each cured call

    @contextlib.contextmanager
    def swapped() -> Iterator[None]:
        unet.set_attn_processor(dict(processors))  # (diffusers empties the dict it is given)
        try:
            yield
        finally:
            unet.set_attn_processor(dict(before))

    fn, net = model.fn, model.network["net"] if model.network else None

    def cured_fn(*args: Any, **kwargs: Any) -> Tensor:
        with swapped():
            return fn(*args, **kwargs)

    def cured_net(*args: Any, **kwargs: Any) -> Tensor:
        assert net is not None
        with swapped():
            return net(*args, **kwargs)

    new = copy.copy(model)
    new.fn = cured_fn
    if model.network is not None:
        new.network = {**model.network, "net": cured_net}
    return new
