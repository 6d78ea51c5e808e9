"""Prompt lists for `predict`: items in the training batch format, one image size per batch, clear errors."""

import json

import pytest
import torch
from torchvision.io import write_png

from manifest_helpers import square_manifest
from tagmoe_lit.data import ManifestDataModule, PromptListDataset, PromptListError, SynthTAGDataModule

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture
def prompt_files(tmp_path):
    (tmp_path / "in").mkdir()
    write_png(torch.full((3, 32, 32), 200, dtype=torch.uint8), str(tmp_path / "in" / "square.png"))
    write_png(torch.full((3, 30, 70), 100, dtype=torch.uint8), str(tmp_path / "in" / "wide.png"))
    entries = [
        {"instruction": "a red circle on a plain blue background", "tags": {"scope": ["image generation"]}},
        {"instruction": "make the red circle blue", "source": "in/square.png", "name": "recolor_1"},
        {"instruction": "invert the colors", "source": ["in/wide.png"], "tags": ["global editing", "style transfer"]},
        {"instruction": "a green square in the center on a plain red background"},
    ]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    yml = tmp_path / "prompts.yaml"
    yml.write_text("- instruction: make the red circle blue\n  source: in/square.png\n- instruction: a blue square\n")
    return jsonl, yml


def test_items_follow_the_batch_contract(prompt_files):
    ds = PromptListDataset(prompt_files[0], 48, "synthtag")
    gen, edit, wide = ds[0], ds[1], ds[2]
    assert gen["target"].shape == (3, 48, 48) and not gen["has_source"] and gen["source"].abs().sum() == 0
    assert gen["tags"].tolist() == ds.schema.multi_hot([3]).tolist() and gen["task"] == -1 and gen["index"] == 0
    assert gen["name"] == "00000" and edit["name"] == "recolor_1" and edit["mask"].all()
    assert edit["has_source"] and torch.allclose(edit["source"], torch.full((3, 48, 48), 200 / 255))  # 32² → the 48² bucket
    assert ds[3]["tags"].sum() == 0  # no tags: zeros
    assert wide["source"].shape == (3, 32, 64) == wide["target"].shape  # 30×70 → nearest bucket within 48² px
    assert ds.batches(8) == [[2], [0, 1, 3]]  # one size per batch, file order within a size
    assert PromptListDataset(prompt_files[0], 32, "synthtag")[2]["target"].shape == (3, 32, 32)  # no wide bucket in 32² px
    yml = PromptListDataset(prompt_files[1], 32, "synthtag")
    assert len(yml) == 2 and yml[0]["has_source"] and yml[1]["name"] == "00001"


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"instruction": ""}\n', r"prompts.jsonl line 1: 'instruction' must be a non-empty string"),
        ('{"instruction": "x", "source": "nope.png"}\n', r"line 1: source image 'nope.png' does not exist"),
        ('{"instruction": "x", "tags": ["cat editing"]}\n', r"line 1: Unknown tag 'cat editing'"),
        ('{"instruction": "x", "name": "../etc"}\n', r"line 1: 'name' '../etc' is not a safe file stem"),
        ('{"instruction": "x"}\n{"instruction"\n', r"prompts.jsonl line 2 is not valid JSON"),
        ("\n", r"has no entries"),
        ('{"instruction": "x", "source": 5}\n', r"line 1: 'source' must be a path or a list of paths, got 5"),
        ('{"instruction": "x", "name": "a"}\n{"instruction": "y", "name": "a"}\n',
         r"prompts.jsonl line 2: name 'a' is also the name of .*prompts.jsonl line 1; give every entry a distinct 'name'"),
        ('{"instruction": "x", "name": "00002"}\n{"instruction": "y"}\n{"instruction": "z"}\n',  # the third's default name
         r"prompts.jsonl line 3: name '00002' is also the name of .*prompts.jsonl line 1; .*named by its row number"),
    ],
)
def test_bad_prompt_lists_say_which_entry_and_what_is_wrong(tmp_path, body, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(body)
    with pytest.raises(PromptListError, match=message):
        PromptListDataset(path, 32, "synthtag")


def test_an_empty_source_list_means_no_source_as_in_manifests(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- instruction: a blue square\n  source: []\n- instruction: a red circle\n  source: null\n")
    items = PromptListDataset(path, 32, "synthtag")
    assert [item["has_source"] for item in items] == [False, False] and items[0]["target"].shape == (3, 32, 32)


def test_manifest_prompt_buckets_use_the_configured_bucket_multiple(prompt_files, tmp_path):
    write_png(torch.full((3, 40, 56), 50, dtype=torch.uint8), str(tmp_path / "in" / "five_by_seven.png"))
    path = tmp_path / "in" / "prompts.jsonl"
    path.write_text('{"instruction": "make it blue", "source": "five_by_seven.png"}\n{"instruction": "a red circle"}\n')
    dm = ManifestDataModule([str(square_manifest(tmp_path))], max_area=96 * 96, bucket_multiple=32, predict_file=str(path))
    sizes = {tuple(b["target"].shape[-2:]) for b in dm.predict_dataloader()}
    assert sizes == {(96, 96)}  # multiples of 32: 5:7 is nearest square (multiples of 16 would have given 80×112)
    assert PromptListDataset(path, 96, "synthtag")[0]["target"].shape == (3, 80, 112)
    with pytest.raises(ValueError, match=r"image_size \(40\) to be a multiple of the bucket multiple \(16\)"):
        PromptListDataset(prompt_files[0], 40, "synthtag", multiple=16)


def test_predict_file_replaces_the_test_split_in_both_data_modules(prompt_files, tmp_path):
    synth = SynthTAGDataModule(image_size=48, predict_file=str(prompt_files[0]), eval_batch_size=8)
    batches = list(synth.predict_dataloader())
    assert [b["target"].shape[-2:] for b in batches] == [(32, 64), (48, 48)]
    assert [b["name"] for b in batches] == [["00002"], ["00000", "recolor_1", "00003"]] and batches[1]["task"].tolist() == [-1] * 3
    assert len(next(iter(SynthTAGDataModule(test_samples=5).predict_dataloader()))["index"]) == 5  # default: the test split
    manifest = ManifestDataModule([str(square_manifest(tmp_path))], max_area=1024, predict_file=str(prompt_files[1]))
    assert [b["instruction"] for b in manifest.predict_dataloader()] == [["make the red circle blue", "a blue square"]]
