"""Finding a component inside a local diffusers Qwen-Image folder (never a hub download).

A Qwen-Image checkpoint is a pipeline folder with one subfolder per component (`transformer/`,
`vae/`, `text_encoder/`, `tokenizer/`, next to `model_index.json`). Every loader in the kit
accepts either that root folder or the component's own folder, so one path can be written once
in a YAML and reused for the backbone, the codec and the text encoder.
"""

from __future__ import annotations

from pathlib import Path


def component_dir(path: str | Path, subfolder: str, owner: str, marker: str = "config.json") -> Path:
    """`path/subfolder` when it holds `marker`, else `path` itself when it does; a clear error otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"{owner}: '{path}' is not a directory; point it at a local Qwen-Image folder (the root or its {subfolder}/)."
        )
    for folder in (root / subfolder, root):
        if (folder / marker).is_file():
            return folder
    raise ValueError(
        f"{owner}: '{path}' holds no {marker}, nor a {subfolder}/ folder with one; point it at a local Qwen-Image "
        f"folder (the root or its {subfolder}/)."
    )
