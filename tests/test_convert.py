"""`convert official` / `convert export`: the release's dMoE forward is reproduced exactly, files round-trip.

The release is simulated at a small width: a tiny `QwenImageTransformer2DModel` whose image FFNs
in its last blocks are replaced by random MegaBlocks dMoE tensors. `ReleaseMoE` is the release's
MoE forward written from its definition (router Linear → softmax → top-1 max → gelu_tanh(x·w1_eᵀ)·w2_e
× the raw probability; the dMoE bias returned beside the output is discarded by the block).
"""

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import save_file

from helpers import (E, LAYERS, MOE_BLOCKS, TAG_DIM, CONFIG, ReleaseMoE, dense_transformer, kit_module, release_state, release_transformer, transformer_inputs, write_release)
from tagmoe_lit.__main__ import run
from tagmoe_lit.convert import files, from_official, kit_tensors, load_transformer_dir, read_state_dict, to_official, transformer_from_dir
from tagmoe_lit.convert.export import load_checkpoint
from tagmoe_lit.identity import CheckpointMismatchError
from tagmoe_lit.moe import MoELayer

@pytest.fixture(scope="module")
def release():
    """(kit module, dense diffusers model, release state dict)."""
    module = kit_module()
    dense = dense_transformer(module)
    return module, dense, release_state(dense)


# -- the conversion reproduces the release's forward -------------------------------------------
@pytest.mark.parametrize("dispatch", ["sorted", "grouped", "loop"])
def test_converted_moe_layer_equals_the_release_dmoe(release, dispatch):
    module, dense, sd = release
    kit, info = from_official(sd)
    D, block = dense.inner_dim, MOE_BLOCKS[0]
    layer = MoELayer(D, 4 * D, num_experts=E, expert_bias=False, dispatch=dispatch)
    pre = f"transformer_blocks.{block}.img_mlp."
    layer.load_state_dict({k[len(pre) :]: v for k, v in kit.items() if k.startswith(pre)})  # strict
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = ReleaseMoE(sd, block)(x), layer.eval()(x)
    assert len(set(layer.route(x.reshape(-1, D))[3].flatten().tolist())) > 1  # several experts in use
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert info.moe_blocks == list(MOE_BLOCKS) and (info.num_experts, info.dim, info.hidden) == (E, D, 4 * D)


def test_converted_transformer_equals_the_release_forward(release, tmp_path):
    module, dense, sd = release
    run(["convert", "official", "--src", str(write_release(tmp_path / "release", sd)), "--dst", str(tmp_path / "kit")])
    assert load_transformer_dir(module, tmp_path / "kit") == []  # backbone, tag embedder and head all loaded
    reference = release_transformer(dense_transformer(module), sd)
    inputs = transformer_inputs(reference)
    with torch.no_grad():
        expected = reference(**inputs)[0]
        got = module.backbone.transformer.eval()(**inputs)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.tag_embedder.table.weight, sd["tag_embedding.weight"])
    torch.testing.assert_close(module.head.net[4].bias, sd["router_head.net.4.bias"])


# -- what the converter reports and refuses ------------------------------------------------------
def test_expert_bias_is_dropped_and_reported(release):
    _, _, sd = release
    kit, info = from_official(sd)
    assert info.dropped == [f"transformer_blocks.{i}.img_mlp.experts.bias" for i in MOE_BLOCKS]
    assert info.dropped_max_abs == max(sd[k].abs().max().item() for k in info.dropped)
    assert not any("experts.bias" in k or "mlp.w1" in k for k in kit)
    assert {k for k in kit if "img_mlp" not in k and not k.startswith(("tag_", "head."))} == {k for k in sd if "img_mlp" not in k and not k.startswith(("tag_", "router_head"))}


def test_missing_keys_and_wrong_shapes_are_listed_in_one_error(release):
    _, _, sd = release
    broken = dict(sd)
    del broken["transformer_blocks.1.img_mlp.experts.mlp.w2"]
    broken["transformer_blocks.2.img_mlp.experts.mlp.w1"] = torch.zeros(E * 10, 32)
    broken["tag_embedding.weight"] = torch.zeros(17, TAG_DIM)
    del broken["router_head.net.2.bias"]
    with pytest.raises(ValueError) as err:
        from_official(broken)
    message = str(err.value)
    for part in (
        "transformer_blocks.1.img_mlp.experts.mlp.w2 is missing",
        "transformer_blocks.2.img_mlp.experts.mlp.w1 has shape [40, 32] but E=4 experts of 32→128 requires [512, 32]",
        "tag_embedding.weight has shape [17, 64] but the official18 schema's 18 tags requires [18, 64]",
        "router_head.net.2.bias is missing",
    ):
        assert part in message
    with pytest.raises(ValueError, match="No MegaBlocks dMoE image FFN found"):
        from_official({k: v for k, v in sd.items() if "img_mlp" not in k})


def test_release_without_tag_embedding_or_head_loads_the_backbone_only(release, tmp_path):
    module, dense, _ = release
    sd = release_state(dense, tag=False, head=False)
    kit, info = from_official(sd)
    assert (info.tag_embedding, info.head) == (False, False)
    assert not any(k.startswith(("tag_embedder.", "head.")) for k in kit)
    torch.save({"state_dict": sd}, tmp_path / "release.pt")  # a wrapped torch file, read with weights_only=True
    config = run(["convert", "official", "--src", str(tmp_path / "release.pt"), "--dst", str(tmp_path / "kit")])
    assert config["components"] == ["backbone"] and config["schema"] is None
    fresh = kit_module()
    table = fresh.tag_embedder.table.weight.clone()
    assert load_transformer_dir(fresh, tmp_path / "kit") == ["tag_embedder", "head"]
    torch.testing.assert_close(fresh.tag_embedder.table.weight, table)  # left as built
    _, info_with_head = from_official(release_state(dense, tag=False))
    assert info_with_head.head  # a head without a tag table is sized from its own last layer


def test_loader_refuses_another_expert_count_or_schema(release, tmp_path):
    _, _, sd = release
    save_file(sd, tmp_path / "release.safetensors")
    run(["convert", "official", "--src", str(tmp_path / "release.safetensors"), "--dst", str(tmp_path / "kit")])
    with pytest.raises(CheckpointMismatchError, match="num_experts: directory 4 vs model 2") as err:
        load_transformer_dir(kit_module(num_experts=2), tmp_path / "kit")
    assert "backbone: wrong shape" in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="schema: directory 'official18' vs model 'synthtag'"):
        load_transformer_dir(kit_module(schema="synthtag"), tmp_path / "kit")
    with pytest.raises(CheckpointMismatchError, match=r"zero_cond_t: directory False vs model True \(set model.backbone.init_args.zero_cond_t"):
        load_transformer_dir(kit_module(zero_cond_t=True), tmp_path / "kit")  # Qwen-Image-Edit-2511's modulation is not the release's


# -- the command line ------------------------------------------------------------------------------
def test_cli_errors_are_one_sentence_and_leave_nothing_behind(release, tmp_path):
    _, _, sd = release
    broken = {k: v for k, v in sd.items() if "net.4.weight" not in k}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(SystemExit, match=r"^convert official: The state dict .* router_head.net.4.weight is missing \(.*\)\.$"):
        run(["convert", "official", "--src", str(tmp_path / "broken.safetensors"), "--dst", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]  # no output, no temporary folder
    with pytest.raises(SystemExit, match="does not exist"):
        run(["convert", "official", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "out")])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    save_file(sd, tmp_path / "release.safetensors")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        run(["convert", "official", "--src", str(tmp_path / "release.safetensors"), "--dst", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
    run(["convert", "official", "--src", str(tmp_path / "release.safetensors"), "--dst", str(tmp_path / "taken"), "--overwrite"])
    assert not (tmp_path / "taken" / "keep.txt").exists()
    with pytest.raises(SystemExit):
        run(["convert", "export", "--dst", str(tmp_path / "x")])  # no --ckpt_path: usage error
    with pytest.raises(SystemExit) as help_exit:
        run(["convert", "official", "--help"])
    assert help_exit.value.code == 0


def test_a_failed_write_leaves_the_destination_as_it_was(release, tmp_path, monkeypatch):
    _, _, sd = release
    kit, info = from_official(sd)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    written = []

    def fail_on_second_shard(tensors, path, metadata=None):
        written.append(path)
        if len(written) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata)

    monkeypatch.setattr(files, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        files.save_transformer_dir(tmp_path / "out", kit, {"layout": "kit"}, max_shard_bytes=2**16, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_release_with_only_moe_weights_takes_dense_keys_from_base(release, tmp_path):
    module, dense, sd = release
    moe_only = {k: v for k, v in sd.items() if "img_mlp" in k or k.startswith(("tag_", "router_head"))}
    save_file(moe_only, tmp_path / "moe.safetensors")
    dense.save_pretrained(tmp_path / "base")  # diffusers' own layout, with config.json
    run(["convert", "official", "--src", str(tmp_path / "moe.safetensors"), "--base", str(tmp_path / "base"), "--dst", str(tmp_path / "kit")])
    assert json.loads((tmp_path / "kit" / "tagmoe_config.json").read_text())["release"]["from_base"] > 0
    assert load_transformer_dir(kit_module(), tmp_path / "kit") == []
    sizes = json.loads((tmp_path / "kit" / "tagmoe_transformer.json").read_text())  # the base's config.json + the MoE
    assert sizes["num_layers"] == LAYERS and sizes["moe_blocks"] == len(MOE_BLOCKS) and sizes["num_experts"] == E


# -- export ----------------------------------------------------------------------------------------
def test_export_from_ckpt_round_trips_through_diffusers(tmp_path):
    module = kit_module()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)  # the `tagmoe` record Lightning's checkpoints carry
    torch.save(ckpt, tmp_path / "last.ckpt")
    (tmp_path / "config.yaml").write_text(CONFIG)
    out = run(["convert", "export", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "last.ckpt"),
               "--dst", str(tmp_path / "exported"), "--max_shard_gb", "0.0001"])
    assert "diffusion_pytorch_model.safetensors.index.json" in out["files"] and "tagmoe_transformer.json" in out["files"]
    transformer = transformer_from_dir(tmp_path / "exported")  # diffusers model + kit MoE, strict keys
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        torch.testing.assert_close(transformer.eval()(**inputs)[0], module.backbone.transformer.eval()(**inputs)[0])
    fresh = kit_module()
    with torch.no_grad():  # kit_module is seeded: make the fresh copy differ, so the load below has to work
        for p in fresh.parameters():
            p.zero_()
    assert load_checkpoint(fresh, tmp_path / "exported") == []
    for k, v in module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    with pytest.raises(EnvironmentError, match="config.json"):  # diffusers' dense class would load half a model
        QwenImageTransformer2DModel.from_pretrained(tmp_path / "exported")


def test_export_official_layout_is_the_release_again(release, tmp_path):
    module, _, sd = release
    (tmp_path / "config.yaml").write_text(CONFIG)
    run(["convert", "official", "--src", str(write_release(tmp_path / "release", sd, shards=2)), "--dst", str(tmp_path / "kit")])
    run(["convert", "export", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "kit"),
         "--dst", str(tmp_path / "official"), "--layout", "official"])
    back = read_state_dict(tmp_path / "official")
    assert set(back) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(back[k], torch.zeros_like(v) if k.endswith("experts.bias") else v)
    with pytest.raises(ValueError, match="experts.b1_EH has no dMoE counterpart"):
        to_official(kit_tensors(kit_module(expert_bias=True)))
