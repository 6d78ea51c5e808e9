"""Instruction refinement before an edit (`edit --rewrite DIR`): a local Qwen2.5-VL restates the
user's instruction, looking at the image, as one explicit editing instruction.

The paper refines instructions at inference but does not publish its prompt; `REWRITE_PROMPT` is
the kit's own. The model is read from a local folder only (`LocalQwenVL`, the annotator's loader;
never a download) and answers greedily, so a rewrite is reproducible. The original instruction
stays in the edit's sidecar beside the rewritten one; an empty answer keeps the original.
"""

from __future__ import annotations

from pathlib import Path

from tagmoe_lit.tags.annotators.qwen_vl import IMAGE_SLOT, LocalQwenVL, _turn

REWRITE_PROMPT = (
    "You rewrite image-editing instructions for an image editing model. Look at the image and the user's "
    "instruction, and reply with ONE imperative sentence that says exactly what to change, naming the object or "
    "region by what it looks like (colour, position, size) and what must stay as it is. Keep the user's intent; do "
    "not add changes they did not ask for. Reply with the sentence only."
)


class InstructionRewriter:
    """`rewriter(instruction, image_path)` → the rewritten instruction."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 64):
        self.vl = LocalQwenVL(model_path, device, dtype, max_new_tokens, owner="edit --rewrite")

    def conversation(self, instruction: str) -> str:
        return _turn("system", REWRITE_PROMPT) + _turn("user", IMAGE_SLOT + f"Instruction: {instruction}") + "<|im_start|>assistant\n"

    def __call__(self, instruction: str, image_path: str | Path) -> str:
        _, image = self.vl.read_image(Path(image_path))
        answer = self.vl.generate([self.conversation(instruction)], [image])[0].strip().splitlines()
        return answer[0].strip() if answer and answer[0].strip() else instruction
