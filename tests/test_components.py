"""Codecs, the frozen text encoder, flow sampling: each against a case with a known answer."""

import pytest
import torch

from tagmoe_lit.backbone import FrozenTextEncoder, PixelCodec, QwenVAECodec
from tagmoe_lit.flow import LogitNormalSampler, interpolate, shift_sigma
from tagmoe_lit.sampling import EulerSampler

TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [False],
            "latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixel_codec_round_trip_is_exact(patch):
    codec = PixelCodec(patch)
    x = torch.rand(2, 3, 16, 16)
    tokens = codec.encode(x)
    assert tokens.shape == (2, (16 // patch) ** 2, 3 * patch * patch) and codec.token_channels == tokens.shape[-1]
    assert torch.equal(codec.decode(tokens, 16 // patch, 16 // patch), x)


def test_qwen_vae_codec_packs_normalized_latents_and_loads_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    codec = QwenVAECodec(config=TINY_VAE)
    assert codec.downsample == 4 and codec.token_channels == 16
    x = torch.rand(2, 3, 16, 16)
    tokens = codec.encode(x)
    assert tokens.shape == (2, 16, 16)
    assert codec.decode(tokens, 4, 4).shape == (2, 3, 16, 16)
    codec.vae.save_pretrained(tmp_path / "vae")
    reloaded = QwenVAECodec(pretrained_path=str(tmp_path / "vae"))
    torch.testing.assert_close(reloaded.encode(x), tokens)
    with pytest.raises(ValueError, match="is not a directory"):
        QwenVAECodec(pretrained_path=str(tmp_path / "missing"))


def test_text_features_do_not_depend_on_batch_mates_and_padding_is_masked():
    enc = FrozenTextEncoder()
    alone, mask_alone = enc(["make the red circle blue"])
    fresh = FrozenTextEncoder()
    both, mask = fresh(["a much longer instruction that pads the other one", "make the red circle blue"])
    n = int(mask_alone.sum())
    assert torch.equal(both[1, :n], alone[0, :n]) and not mask[1, n:].any() and mask[0].all()
    assert enc.dim == 384
    small = FrozenTextEncoder(cache_size=2)
    small(["a", "b"]), small(["a", "c"])  # "b" is least recently used
    assert small.cached_instructions() == ["a", "c"]
    torch.testing.assert_close(small(["b"])[0], enc(["b"])[0])
    with pytest.raises(ValueError, match="does not exist"):
        FrozenTextEncoder("/nonexistent/model")


def test_euler_sampler_with_the_exact_velocity_lands_on_the_data():
    x0 = torch.randn(3, 16, 12)

    def exact_velocity(x, reference, grid, instructions, sigma):
        s = sigma.view(-1, 1, 1)
        return (x - x0) / s, None  # on the straight path x_σ = (1−σ)x0 + σε, v = ε − x0 = (x_σ − x0)/σ

    sampler = EulerSampler(steps=5, guidance=1.0, shift=3.0)
    out = sampler(exact_velocity, ["a"] * 3, torch.zeros(3, 16, 12), (4, 4), 12, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_flow_helpers():
    x0, noise = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert torch.equal(interpolate(x0, noise, torch.tensor([0.0, 1.0]))[:, 0, 0], torch.tensor([0.0, 1.0]))
    assert shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    s = LogitNormalSampler(shift=1.0)(10_000, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.02
