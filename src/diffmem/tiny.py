"""Tiny text-to-image pipelines built here, from a configuration and a vocabulary written in
this module (nothing is downloaded): a character-level CLIP tokenizer, a 2-layer CLIP text
encoder, a small ``UNet2DConditionModel`` and a two-level ``AutoencoderKL``, in Stable
Diffusion's layout. The test suite, the examples and the ``mitigate-captions`` experiment
train or load them on a CPU. Needs ``diffmem[pipelines]`` (diffusers, transformers)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def write_tokenizer(folder: Path, max_length: int = 24) -> int:
    """A CLIP BPE tokenizer without merges: every word is spelled letter by letter (the last
    letter carries CLIP's end-of-word mark). Returns its vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab = SPECIAL + letters + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return len(vocab)


def sd_pipeline(folder: Path, *, prediction: str = "epsilon", scheduler: str = "DDIMScheduler",
                vocab_extra: int = 0, max_length: int = 24, seed: int = 0,
                latent_size: int = 8, channels: tuple[int, int] = (16, 32),
                timesteps: int = 100) -> Path:
    """A tiny Stable Diffusion layout saved in ``folder``: ``latent_size`` squared latents
    of 4 channels (default 8), RGB images twice that size; Stable Diffusion's betas over
    ``timesteps`` steps (1000 for a model to train: with 100 the last step keeps most of
    the signal)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tmp = folder.parent / f"{folder.name}_tokenizer"
    vocab = write_tokenizer(tmp, max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp))
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab - vocab_extra, hidden_size=32, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    unet = diffusers.UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = tiny_vae(latent_size)
    sched = getattr(diffusers, scheduler)(
        num_train_timesteps=timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, prediction_type=prediction, steps_offset=1,
        **({"clip_sample": False} if scheduler in ("DDIMScheduler", "DDPMScheduler") else {}))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def tiny_vae(latent_size: int, **extra: Any) -> Any:
    """A two-level ``AutoencoderKL``: 3-channel images of ``2 latent_size`` squared, 4-channel
    latents of ``latent_size`` squared (``extra``: more of its config)."""
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
        sample_size=2 * latent_size, **extra)


def clip_model(folder: Path, image_size: int = 16, max_length: int = 24, seed: int = 0) -> Path:
    """A tiny two-tower CLIP (transformers' ``CLIPModel``, 2-layer text and vision towers,
    16-dimensional projections) saved in ``folder`` with this module's tokenizer: the layout
    of a published CLIP checkpoint folder, for ``--features``."""
    from transformers import CLIPConfig, CLIPModel

    vocab = write_tokenizer(folder, max_length)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": max_length, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4},
        projection_dim=16)).save_pretrained(str(folder))
    return folder
