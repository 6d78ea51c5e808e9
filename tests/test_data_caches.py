"""Disk caches keyed by content hash: exact reuse across instances, atomic files, and `python -m tagmoe_lit cache`."""

import os

import pytest
import torch

from manifest_helpers import square_manifest
from tagmoe_lit.__main__ import run
from tagmoe_lit.backbone import FrozenTextEncoder, PixelCodec
from tagmoe_lit.backbone import CachedCodec, CachedTextEncoder
from tagmoe_lit.backbone.tensor_cache import TensorCache, tensor_key
from tagmoe_lit.io import atomic_write_bytes, atomic_write_text, relative_path
from tagmoe_lit.tags.annotators.answer_cache import folder_fingerprint
from helpers import BASE

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def test_tensor_cache_round_trips_exactly_and_leaves_no_temporary_files(tmp_path):
    cache = TensorCache(tmp_path, "ns")
    x = torch.randn(5, 7)
    key = tensor_key(x)
    assert cache.get(key) is None
    cache.put(key, x)
    assert torch.equal(cache.get(key), x) and len(cache) == 1
    assert not list(tmp_path.rglob("*.tmp"))
    assert len({tensor_key(x), tensor_key(x.double()), tensor_key(x.view(7, 5)), tensor_key(x + 1e-7)}) == 4


def test_atomic_writes_replace_whole_files_and_clean_up_after_a_failure(tmp_path, monkeypatch):
    path = tmp_path / "new" / "folder" / "report.md"
    atomic_write_text(path, "héllo ✓\n")
    assert path.read_bytes() == "héllo ✓\n".encode("utf-8")  # UTF-8 whatever the locale, parents created
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "never seen")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["report.md"]  # old file kept, no temporary left
    assert relative_path("./images//a.png", tmp_path) == relative_path(str(tmp_path / "images" / "a.png"), tmp_path) == "images/a.png"


def test_folder_fingerprint_notices_a_large_file_rewritten_with_the_same_size(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * (1 << 20))  # large: hashed by name, size and mtime, not read
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    before = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == before
    weights.write_bytes(b"b" * (1 << 20))
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    assert folder_fingerprint(tmp_path) != before


def test_cached_text_encoder_serves_a_new_instance_from_disk_bit_for_bit(tmp_path, monkeypatch):
    texts = ["make the red circle blue", "add a green square at the top", "make the red circle blue"]
    first = CachedTextEncoder(str(tmp_path))
    hidden, mask = first(texts)
    plain = FrozenTextEncoder()(texts)
    assert torch.equal(hidden, plain[0]) and torch.equal(mask, plain[1])  # the cache never changes features
    assert len(first.store) == 2
    second = CachedTextEncoder(str(tmp_path))
    monkeypatch.setattr(second, "_load", lambda: pytest.fail("a cached instruction was encoded again"))
    assert torch.equal(second(texts)[0], hidden)
    assert CachedTextEncoder(str(tmp_path), max_length=8).store.root != first.store.root  # other settings, other folder


def test_cached_codec_encodes_each_image_once_per_codec(tmp_path, monkeypatch):
    images = torch.rand(3, 3, 16, 16)
    cached = CachedCodec(PixelCodec(patch=4), str(tmp_path))
    assert torch.equal(cached.encode(images), PixelCodec(patch=4).encode(images))
    assert (cached.token_channels, cached.downsample, cached.patch, cached.channels) == (48, 4, 4, 3)
    again = CachedCodec(PixelCodec(patch=4), str(tmp_path))
    monkeypatch.setattr(again.codec, "encode", lambda x: pytest.fail("a cached image was encoded again"))
    assert torch.equal(again.encode(images), cached.encode(images))
    assert CachedCodec(PixelCodec(patch=2), str(tmp_path)).store.root != cached.store.root
    tokens = cached.encode(images)
    assert torch.equal(cached.decode(tokens, 4, 4), PixelCodec(patch=4).decode(tokens, 4, 4))


def test_cached_codec_keys_images_by_value_not_dtype(tmp_path, monkeypatch):
    images = torch.rand(2, 3, 16, 16).bfloat16().float()  # float32 values that bfloat16 holds exactly
    built = CachedCodec(PixelCodec(patch=4), str(tmp_path))
    tokens = built.encode(images)  # as the cache command does: float32 images
    bf16 = CachedCodec(PixelCodec(patch=4), str(tmp_path))
    monkeypatch.setattr(bf16.codec, "encode", lambda x: pytest.fail("a bfloat16 image missed its float32 entry"))
    served = bf16.encode(images.bfloat16())
    assert served.dtype == torch.bfloat16 and torch.equal(served, tokens.bfloat16())  # in the input's dtype


def test_cache_command_fills_both_caches_from_a_fit_config(tmp_path):
    manifest = square_manifest(tmp_path, n=9)
    overlay = tmp_path / "cached.yaml"
    overlay.write_text(f"""
model:
  text_encoder:
    class_path: tagmoe_lit.backbone.CachedTextEncoder
    init_args: {{cache_dir: {tmp_path / 'cache'}}}
  codec:
    class_path: tagmoe_lit.backbone.CachedCodec
    init_args:
      cache_dir: {tmp_path / 'cache'}
      codec: {{class_path: tagmoe_lit.backbone.PixelCodec, init_args: {{patch: 4}}}}
data:
  class_path: tagmoe_lit.data.ManifestDataModule
  init_args: {{manifests: [{manifest}], max_area: 1024, val_fraction: 0.2}}
""")
    args = ["cache", "--config", str(BASE), "--config", str(overlay), "--trainer.logger", "false"]
    counts = run(args)
    instructions = {line.split('"instruction": ')[1].split('", ')[0] for line in manifest.read_text().splitlines()}
    images = len(list((manifest.parent / "images").glob("*.png")))
    assert counts == {"rows": 9, "text_entries": len(instructions), "codec_entries": images + 1}  # + the blank source of text-to-image
    assert run(args) == counts  # a second run finds everything cached
    with pytest.raises(SystemExit, match="Nothing to cache"):
        run(["cache", "--config", str(BASE), "--data", "tagmoe_lit.data.ManifestDataModule", "--data.manifests", f"[{manifest}]",
             "--data.max_area", "1024", "--trainer.logger", "false"])
