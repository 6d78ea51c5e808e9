"""`TagMoEQwenImageTransformer2DModel`: a `convert export` directory is a diffusers model that loads
right or not at all. What diffusers' own model tests check, in the kit's words: save/load through
`from_pretrained` (one file and sharded with an index), the dtype on load, equal outputs after
reload, every MoE weight really loaded (not meta, not re-initialized), use in a stock pipeline,
and the dense class refusing the directory."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from helpers import CONFIG, E, LAYERS, MOE_BLOCKS, TINY_TRANSFORMER, kit_module, transformer_output
from tagmoe_lit import TagMoEQwenImageTransformer2DModel
from tagmoe_lit.__main__ import run
from tagmoe_lit.convert import transformer_from_dir
from tagmoe_lit.convert.transformer import CONFIG_NAME
from tagmoe_lit.moe import MoELayer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kit module, {"single": dir, "sharded": dir}) written by `convert export` from a Lightning checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    module = kit_module()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "last.ckpt")
    (tmp / "config.yaml").write_text(CONFIG)
    dirs = {}
    for name, gb in (("single", "1"), ("sharded", "0.0001")):
        dirs[name] = tmp / name
        run(["convert", "export", "--config", str(tmp / "config.yaml"), "--ckpt_path", str(tmp / "last.ckpt"), "--dst", str(dirs[name]),
             "--max_shard_gb", gb])
    assert (dirs["sharded"] / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (dirs["single"] / "diffusion_pytorch_model.safetensors").is_file()
    return module, dirs


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_export_loads_through_diffusers_from_pretrained_with_every_moe_weight(exported, layout, low_cpu_mem_usage):
    module, dirs = exported
    transformer = TagMoEQwenImageTransformer2DModel.from_pretrained(dirs[layout], low_cpu_mem_usage=low_cpu_mem_usage)
    moe = [b.img_mlp for b in transformer.transformer_blocks]
    assert [isinstance(m, MoELayer) for m in moe] == [i in MOE_BLOCKS for i in range(LAYERS)]
    assert moe[-1].num_experts == E
    assert not any(t.is_meta for t in [*transformer.parameters(), *transformer.buffers()])
    mine = {k: v for k, v in module.state_dict().items() if k.startswith("backbone.transformer.")}
    assert len(mine) == len(transformer.state_dict())
    for key, value in transformer.state_dict().items():  # not re-initialized: every tensor is the checkpoint's
        torch.testing.assert_close(value, mine["backbone.transformer." + key], rtol=0, atol=0)
    torch.testing.assert_close(transformer_output(transformer), transformer_output(module.backbone.transformer))


def test_dtype_on_load_and_the_save_pretrained_round_trip(exported, tmp_path):
    module, dirs = exported
    bf16 = TagMoEQwenImageTransformer2DModel.from_pretrained(dirs["single"], torch_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.transformer_blocks[-1].img_mlp.experts.w1_EDH.dtype == torch.bfloat16
    transformer = TagMoEQwenImageTransformer2DModel.from_pretrained(dirs["single"])
    for name, shard in (("one", "10GB"), ("many", "20KB")):
        transformer.save_pretrained(tmp_path / name, max_shard_size=shard)
        assert not (tmp_path / name / "config.json").exists()  # so the dense class cannot take it
        again = TagMoEQwenImageTransformer2DModel.from_pretrained(tmp_path / name)
        torch.testing.assert_close(transformer_output(again), transformer_output(transformer), rtol=0, atol=0)
    assert (tmp_path / "many" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_the_dense_class_refuses_the_directory_and_its_readme_says_what_to_use(exported):
    _, dirs = exported
    for layout in dirs.values():
        with pytest.raises(EnvironmentError, match="config.json"):
            QwenImageTransformer2DModel.from_pretrained(layout)
        with pytest.raises(EnvironmentError, match="config.json"):
            QwenImageTransformer2DModel.from_pretrained(layout, low_cpu_mem_usage=False)
        assert "TagMoEQwenImageTransformer2DModel.from_pretrained" in (layout / "README.md").read_text()


def test_a_directory_that_does_not_fit_its_config_is_refused(exported, tmp_path):
    _, dirs = exported
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dirs["single"], broken)
    config = json.loads((broken / CONFIG_NAME).read_text())
    (broken / CONFIG_NAME).write_text(json.dumps({**config, "num_experts": E + 2}))
    with pytest.raises(ValueError, match=r"does not fit its own tagmoe_transformer.json \(.*w1_EDH expected shape.*convert export"):
        TagMoEQwenImageTransformer2DModel.from_pretrained(broken)
    with pytest.raises(ValueError, match="would leave mismatched experts randomly initialized"):
        TagMoEQwenImageTransformer2DModel.from_pretrained(broken, low_cpu_mem_usage=False, ignore_mismatched_sizes=True)
    (broken / CONFIG_NAME).write_text(json.dumps({**config, "num_layers": LAYERS + 1}))  # a block with no weights
    for low_cpu_mem_usage in (True, False):
        with pytest.raises(ValueError, match=r"does not fit its own tagmoe_transformer.json \(\d+ missing keys: .*; 3 unexpected keys: "):
            TagMoEQwenImageTransformer2DModel.from_pretrained(broken, low_cpu_mem_usage=low_cpu_mem_usage)


def test_a_directory_written_before_the_class_still_loads(exported, tmp_path):
    """Earlier exports carried the dense config.json beside tagmoe_config.json: `transformer_from_dir` reads them."""
    module, dirs = exported
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dirs["single"], old)
    (old / CONFIG_NAME).unlink()
    (old / "config.json").write_text(module.backbone.transformer.to_json_string())
    torch.testing.assert_close(transformer_output(transformer_from_dir(old)), transformer_output(module.backbone.transformer), rtol=0, atol=0)
    (old / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="neither tagmoe_transformer.json nor diffusers' config.json"):
        transformer_from_dir(old)


def test_a_stock_pipeline_runs_it_and_saves_and_reloads_it_by_class_name(pipeline, tmp_path):
    """`transformer=` in a stock QwenImagePipeline; the pipeline folder's model_index.json names
    the class by module and name, and `DiffusionPipeline.from_pretrained` builds it again."""
    torch.manual_seed(5)
    transformer = TagMoEQwenImageTransformer2DModel(**TINY_TRANSFORMER, num_experts=E, moe_blocks=2).eval()
    routed = []
    for block in transformer.transformer_blocks[-2:]:
        block.img_mlp.register_forward_hook(lambda m, i, o: routed.append(i[0].shape))
    pipe = QwenImagePipeline(**{**pipeline.components, "transformer": transformer})
    run_pipe = lambda p: p("a red square", negative_prompt=" ", true_cfg_scale=2.0, num_inference_steps=2, height=32, width=32,
                           generator=torch.Generator().manual_seed(0), output_type="latent").images
    first = run_pipe(pipe)
    assert len(routed) == 2 * 2 * 2  # 2 MoE blocks × 2 steps × (conditional + negative)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["tagmoe_lit.convert.transformer", "TagMoEQwenImageTransformer2DModel"]
    again = DiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    assert type(again.transformer) is TagMoEQwenImageTransformer2DModel
    reloaded = again.transformer.state_dict()
    assert reloaded.keys() == transformer.state_dict().keys()
    for key, value in transformer.state_dict().items():  # every weight is the saved one, bit for bit
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    # The reloaded weights live in safetensors' buffers, most not 64-byte aligned, so CPU matmul takes
    # other SIMD paths and the latents move by ~6e-7; in freshly allocated (aligned) memory they are bitwise.
    with torch.no_grad():
        for param in again.transformer.parameters():
            param.data = param.data.clone()
    torch.testing.assert_close(run_pipe(again), first, rtol=0, atol=0)
