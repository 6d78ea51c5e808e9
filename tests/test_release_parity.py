"""The kit edits an image as the TAG-MoE release's pipeline does (`pipeline_qwenimage_tagmoe.py`,
`infer_tagmoe.py`), step for step, on a tiny random Qwen-Image in the release's layout.

The reference below is written from the release's steps, not from the kit: RGBA composited on
white, the nearest-aspect resolution (|w/h − W/H|, LANCZOS stretch), `VaeImageProcessor`, VAE
latents normalized with latents_mean / latents_std and packed 2×2, the T2I prompt template with its
34 prefix tokens dropped from `hidden_states[-1]`, `FlowMatchEulerDiscreteScheduler` with Qwen-Image's
config, σ = linspace(1, 1/N, N) and μ from the token count, the transformer called with t/1000 on
[target, reference] tokens, true CFG 4 with the per-token norm rescale and negative prompt " ". The
release's MoE forward is `helpers.ReleaseMoE`. Two things are taken like with like: the VAE's
*mode* (the release draws `latent_dist.sample()` from the unseeded global RNG, so no run of it is
reproducible), and the reference frame fed through diffusers' two-frame `img_shapes` (the release's
`cond_hidden_states` + `get_img_rope(frame_idx=1)`: the same RoPE for a reference of the target's size).
"""

import copy
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from helpers import E, TAG_DIM, TINY_TRANSFORMER, release_state, release_transformer, write_release
from tagmoe_lit.__main__ import run
from tagmoe_lit.align import SumTagEmbedder
from tagmoe_lit.backbone import QwenImageBackbone, QwenVAECodec, QwenVLTextEncoder
from tagmoe_lit.convert.export import load_checkpoint
from tagmoe_lit.editing import edit, kit_resolutions, reference_pixels, starting_noise
from tagmoe_lit.module import TagMoEModule
from tagmoe_lit.moe import MoELayer
from tagmoe_lit.sampling import QwenImageSampler

STEPS, CFG, PROMPT = 30, 4.0, "turn the red square blue"
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
            "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000, shift=1.0,
                 shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def source_image() -> Image.Image:
    """50×30 RGBA: a red square on a half-transparent background (compositing and resizing both matter)."""
    rgba = np.zeros((30, 50, 4), dtype=np.uint8)
    rgba[..., 1], rgba[..., 3] = 120, 100
    rgba[8:22, 10:24] = (230, 20, 20, 255)
    return Image.fromarray(rgba, "RGBA")


# -- the release, re-derived --------------------------------------------------------------------------
def release_text(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = pipe.tokenizer([TEMPLATE.format(prompt)], max_length=1024 + 34, padding=True, truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True).hidden_states[-1]
    kept = hidden[tokens.attention_mask.bool()][34:]
    return kept[None], torch.ones(1, kept.shape[0], dtype=torch.long)


def release_pack(latents: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    latents = latents.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(1, (h // 2) * (w // 2), c * 4)


@torch.no_grad()
def release_edit(pipe, transformer, image: Image.Image, resolutions: list[tuple[int, int]], latents: torch.Tensor) -> torch.Tensor:
    """The release's `predict` + pipeline `__call__` on `image`, from packed starting `latents`."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    cond = Image.alpha_composite(white.convert("RGBA"), image).convert("RGB")
    _, width, height = min((abs(image.size[0] / image.size[1] - w / h), w, h) for w, h in resolutions)
    cond = cond.resize((width, height), Image.LANCZOS)
    vae, s = pipe.vae, 2 ** len(pipe.vae.temperal_downsample)
    pixels = VaeImageProcessor(vae_scale_factor=s * 2).preprocess(cond, height, width)
    z = vae.encode(pixels[:, :, None]).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    z = (z - mean) * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))
    cond_tokens = release_pack(z, vae.config.z_dim, *z.shape[-2:])
    text, text_mask = release_text(pipe, PROMPT)
    neg, neg_mask = release_text(pipe, " ")
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    c = scheduler.config
    mu = latents.shape[1] * (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len) + (
        c.base_shift - (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len) * c.base_image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    scheduler.set_begin_index(0)
    grid = (1, height // s // 2, width // s // 2)
    T = latents.shape[1]

    def forward(txt, mask, t):
        out = transformer(hidden_states=torch.cat([latents, cond_tokens], 1), timestep=t.expand(1).to(latents.dtype) / 1000,
                          encoder_hidden_states=txt, encoder_hidden_states_mask=mask, img_shapes=[[grid, grid]], return_dict=False)[0]
        return out[:, :T]

    for t in scheduler.timesteps:
        v, v_neg = forward(text, text_mask, t), forward(neg, neg_mask, t)
        comb = v_neg + CFG * (v - v_neg)
        v = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


# -- the kit ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(pipeline, qwen_root, tmp_path_factory):
    """(the release transformer, a kit model loaded from the `convert official` output of the same weights)."""
    tmp = tmp_path_factory.mktemp("parity")
    sd = release_state(pipeline.transformer, seed=7)
    run(["convert", "official", "--src", str(write_release(tmp / "release", sd, shards=2)), "--dst", str(tmp / "kit")])
    sizes = {k: TINY_TRANSFORMER[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "axes_dims_rope")}
    module = TagMoEModule(
        schema="official18",
        backbone=partial(QwenImageBackbone, **sizes, zero_cond_t=False, moe_blocks=2,
                         moe=partial(MoELayer, num_experts=E, expert_bias=False)),
        codec=QwenVAECodec(pretrained_path=str(qwen_root)),
        text_encoder=QwenVLTextEncoder(pretrained_path=str(qwen_root), dtype="float32"),
        tag_embedder=partial(SumTagEmbedder, dim=TAG_DIM),
    )
    assert load_checkpoint(module, tmp / "kit") == []
    return release_transformer(copy.deepcopy(pipeline.transformer), sd), module.eval()


def test_the_kit_edits_as_the_release_pipeline_does(pipeline, converted):
    transformer, module = converted
    resolutions = kit_resolutions(32, 4)  # the tiny model's buckets; the release's 1 MP list has the same rule
    pixels = reference_pixels(source_image(), resolutions)
    assert tuple(pixels.shape) == (3, 24, 40)  # 50×30 snapped to 40×24
    grid = module.grid(pixels[None])
    noise = starting_noise(11, grid, channels=4, patch=2)
    release_noise = release_pack(randn_tensor((1, 1, 4, 2 * grid[0], 2 * grid[1]), generator=torch.Generator().manual_seed(11)), 4,
                                 2 * grid[0], 2 * grid[1])
    torch.testing.assert_close(noise, release_noise, rtol=0, atol=0)  # on CPU, a seed gives the release's noise
    expected = release_edit(pipeline, transformer, source_image(), resolutions, noise.clone())
    result = edit(module, pixels, PROMPT, QwenImageSampler(steps=STEPS, guidance=CFG, negative_prompt=""), noise=noise)
    assert expected.abs().max() > 0.5  # a real trajectory, not a vanishing one
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-4)
    assert result.signature_LE.shape == (2, E) and torch.allclose(result.signature_LE.sum(-1), torch.ones(2))
    assert result.predicted_tags and set(result.predicted_tags) <= set(module.schema.names)
    print(f"max |kit − release| over the final latents: {(result.tokens - expected).abs().max():.2e}")
    # the comparison can tell the rules apart: without the norm rescale the latents end elsewhere
    plain = edit(module, pixels, PROMPT, QwenImageSampler(steps=STEPS, guidance=CFG, renormalize=False), noise=noise)
    assert (plain.tokens - expected).abs().max() > 1e-2
