"""Tiny, randomly initialized text-to-image pipelines built here (nothing is downloaded;
the Stable Diffusion layout, its tokenizer and VAE come from :mod:`diffmem.tiny`):
character-level CLIP and T5 tokenizers written from a vocabulary in this file, 2-layer text
encoders, small denoisers (UNets, SD3, PixArt and FLUX transformers) and a two-level
AutoencoderKL."""

import string
from pathlib import Path

import torch

from diffmem.tiny import SPECIAL, clip_model, sd_pipeline, tiny_vae, write_tokenizer  # noqa: F401


def _clip_pair(folder: Path, name: str, *, projection: bool, max_length: int = 24,
               hidden: int = 32):
    """A tokenizer and a CLIP text encoder (with a projection for pooled embeddings)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tmp = folder.parent / f"{folder.name}_{name}"
    vocab = write_tokenizer(tmp, max_length)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=max_length, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=hidden)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return CLIPTokenizer.from_pretrained(str(tmp)), cls(config)


def sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL layout: two CLIP encoders (the second with a projection: pooled
    embeddings), a UNet with SDXL's text-and-size added conditioning."""
    import diffusers

    torch.manual_seed(seed)
    tok, enc = _clip_pair(folder, "tok1", projection=False)
    tok2, enc2 = _clip_pair(folder, "tok2", projection=True)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=1)
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(8), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=sched)
    pipe.save_pretrained(str(folder))
    return folder


def sd3_pipeline(folder: Path, seed: int = 0, **scheduler_options) -> Path:
    """A tiny SD3 layout: two CLIP encoders with projections (no T5: its embeddings are
    zeros, as the pipeline allows), an SD3 transformer, flow matching."""
    import diffusers

    torch.manual_seed(seed)
    tok, enc = _clip_pair(folder, "tok1", projection=True)
    tok2, enc2 = _clip_pair(folder, "tok2", projection=True)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=100, **{"shift": 3.0, **scheduler_options})
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_vae(8, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=enc, text_encoder_2=enc2, text_encoder_3=None, tokenizer=tok,
        tokenizer_2=tok2, tokenizer_3=None, scheduler=sched)
    pipe.save_pretrained(str(folder))
    return folder


def dit_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny DiT layout: a class-conditional diffusion transformer with a learned
    variance on 8x8x4 latents, a VAE, DDIM."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4)
    sched = diffusers.DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(8), scheduler=sched)
    pipe.save_pretrained(str(folder))
    return folder


def tiny_unet(seed: int = 0):
    """A 1-channel 8x8 UNet2DModel of two small levels, seeded."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def t5_pair(folder: Path, max_length: int = 32):
    """A character-level T5 tokenizer (a unigram model over single letters and digits,
    with and without the word-start mark, built by ``tokenizers``) and a 2-layer T5 encoder
    whose vocabulary matches it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["<pad>", "</s>", "<unk>", "\u2581"] + letters + ["\u2581" + c for c in letters]
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in vocab], unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                         unk_token="<unk>", extra_ids=0, model_max_length=max_length)
    tmp = folder.parent / f"{folder.name}_t5"
    t5.save_pretrained(str(tmp))
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37,
                                      num_layers=2, num_heads=4, pad_token_id=0,
                                      eos_token_id=1))
    return T5TokenizerFast.from_pretrained(str(tmp)), encoder


def flux_pipeline(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX layout: a CLIP encoder (pooled), a T5 encoder, a FLUX transformer on
    packed 4-channel latents (with the distilled guidance input), dynamic shifting."""
    import diffusers

    torch.manual_seed(seed)
    tok, enc = _clip_pair(folder, "tok1", projection=False)
    tok2, enc2 = t5_pair(folder)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 2, 2))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, base_image_seq_len=16,
        max_image_seq_len=256)
    pipe = diffusers.FluxPipeline(
        scheduler=sched, vae=tiny_vae(8, shift_factor=0.06, scaling_factor=1.5), text_encoder=enc,
        tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(str(folder))
    return folder


def pixart_pipeline(folder: Path, seed: int = 0, sigma: bool = False) -> Path:
    """A tiny PixArt-alpha (or -sigma) layout: a T5 encoder, a PixArt transformer with a
    learned variance, DPM-Solver."""
    import diffusers

    torch.manual_seed(seed)
    tok, enc = t5_pair(folder)
    net = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16,
        norm_type="ada_norm_single", use_additional_conditions=False)
    cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
    pipe = cls(tokenizer=tok, text_encoder=enc, vae=tiny_vae(8), transformer=net,
               scheduler=diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100))
    pipe.save_pretrained(str(folder))
    return folder


def class_unet(root: Path, prediction: str = "epsilon") -> Path:
    """A class-conditional UNet2DModel in ``root/net`` (8x8 grey images, labels 0-2, 3 the
    null one) with a DDIM scheduler of 50 training steps and ``prediction``, 12 training
    images in [-1, 1] (``root/train.npy``) and their labels (``root/labels.npy``, 4 each)."""
    import diffusers
    import numpy as np

    torch.manual_seed(0)
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, num_class_embeds=4).save_pretrained(root / "net")
    diffusers.DDIMScheduler(num_train_timesteps=50, clip_sample=False,
                            prediction_type=prediction).save_pretrained(root / "net")
    gen = np.random.default_rng(0)
    np.save(root / "train.npy", gen.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32))
    np.save(root / "labels.npy", np.repeat(np.arange(3), 4))
    return root
