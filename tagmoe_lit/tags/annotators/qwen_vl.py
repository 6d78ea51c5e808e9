"""`QwenVLAnnotator`: tags from a local Qwen2.5-VL, asked with a prompt built from the schema.

The paper annotates with Qwen-VL; its prompt is unpublished, so ours is `answer.build_prompt`: the
levels and their tag names, and a JSON answer format. Each request shows the model the source
image(s) (downscaled to at most `max_pixels`) and the instruction, in Qwen2.5-VL's chat format
(`<|im_start|>role … <|im_end|>`, one `<|vision_start|><|image_pad|><|vision_end|>` per image,
expanded by the model's own processor). Requests run in batches, greedily (deterministic). An
answer that `answer.parse_answer` rejects is retried up to `retries` times with the reason appended
to the conversation; if it is still invalid the row is flagged (`problem`) with empty tags, never
given tags the model did not validly name. A row whose source image cannot be read is flagged the
same way without asking the model, so one bad file does not stop a long `annotate` run.

Answers are cached by content hash (`answer_cache`): the model folder's fingerprint, the prompt,
the instruction, every image's bytes and the generation settings.

The model is read from a local folder only (`local_files_only=True`): download a Qwen2.5-VL
checkpoint (e.g. Qwen/Qwen2.5-VL-7B-Instruct) there first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from tagmoe_lit.tags.annotators.answer import AnswerError, build_prompt, parse_answer
from tagmoe_lit.tags.annotators.answer_cache import AnswerCache, content_key, folder_fingerprint
from tagmoe_lit.tags.annotators.base import Annotation, AnnotationRequest
from tagmoe_lit.tags.schema import TagSchema

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
RETRY_REQUEST = "That answer is invalid: {reason}. Reply with the JSON object only, using tag names from the lists."


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


class LocalQwenVL:
    """A Qwen2.5-VL (transformers `Qwen2_5_VLForConditionalGeneration`) from a local folder, loaded on
    first use: reads images as it wants them and answers chat texts greedily. Serves the annotator
    and `edit --rewrite` (`tagmoe_lit/rewrite.py`)."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 128,
                 max_pixels: int = 512 * 28 * 28, owner: str = "QwenVLAnnotator"):
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise ValueError(
                f"{owner}: '{model_path}' is not a local model folder with a config.json; "
                "download a Qwen2.5-VL checkpoint (e.g. Qwen/Qwen2.5-VL-7B-Instruct) there and pass its path."
            )
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"{owner}: dtype {dtype!r} is not a torch dtype; use 'auto', 'float32', 'bfloat16' or 'float16'.")
        if max_new_tokens < 1:
            raise ValueError(f"{owner}: need max_new_tokens >= 1; got {max_new_tokens}.")
        self.device, self.dtype, self.max_new_tokens, self.max_pixels = device, dtype, max_new_tokens, max_pixels
        self.fingerprint = folder_fingerprint(self.model_path)
        self._model = self._processor = None

    def load(self):
        if self._model is None:
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
            self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
            self._processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_path, local_files_only=True, dtype=dtype)
            self._model = model.to(self.device).eval()
        return self._model, self._processor

    def read_image(self, path: Path) -> tuple[bytes, torch.Tensor]:
        """(file bytes, uint8 [3, H, W] no larger than max_pixels); OSError or RuntimeError when unreadable."""
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import resize

        data = path.read_bytes()
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        H, W = image.shape[-2:]
        if H * W > self.max_pixels:
            scale = (self.max_pixels / (H * W)) ** 0.5
            image = resize(image, [max(28, int(H * scale)), max(28, int(W * scale))], antialias=True)
        return data, image

    @torch.no_grad()
    def generate(self, texts: list[str], images: list[torch.Tensor]) -> list[str]:
        """Greedy answers to chat `texts` (each ending in the assistant's turn), images in slot order."""
        model, processor = self.load()
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True).to(self.device)
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class QwenVLAnnotator:
    """Tags asked of a `LocalQwenVL`."""

    name = "qwen_vl"

    def __init__(
        self,
        schema: TagSchema | str,
        model_path: str,
        batch_size: int = 4,
        max_new_tokens: int = 128,
        retries: int = 1,
        device: str = "cpu",
        dtype: str = "auto",
        max_pixels: int = 512 * 28 * 28,
        cache_dir: str | None = None,
    ):
        """
        Args:
            schema: tag schema (name, path or loaded).
            model_path: local folder of a Qwen2.5-VL checkpoint (config, weights, processor files).
            batch_size: requests per `generate` call.
            max_new_tokens: answer length limit.
            retries: extra attempts for an invalid answer, each told what was wrong.
            device: torch device for the model.
            dtype: weights dtype ("auto": the checkpoint's; or "float32", "bfloat16", "float16").
            max_pixels: larger input images are downscaled to this area before the processor.
            cache_dir: answer cache folder (None: no cache).
        """
        self.schema = TagSchema.load(schema) if isinstance(schema, str) else schema
        self.vl = LocalQwenVL(model_path, device, dtype, max_new_tokens, max_pixels)
        if batch_size < 1 or retries < 0:
            raise ValueError(f"QwenVLAnnotator: need batch_size >= 1, retries >= 0; got {batch_size}, {retries}.")
        self.batch_size, self.max_new_tokens, self.retries, self.max_pixels = batch_size, max_new_tokens, retries, max_pixels
        self.system = build_prompt(self.schema)
        self.cache = AnswerCache(cache_dir)
        self._fingerprint = self.vl.fingerprint

    def _generate(self, texts: list[str], images: list[torch.Tensor]) -> list[str]:
        return self.vl.generate(texts, images)

    def _read_sources(self, sources: Sequence[Path]) -> tuple[list[tuple[bytes, torch.Tensor]], str | None]:
        """Every source read, or no image and the problem with the first unreadable one."""
        read = []
        for path in sources:
            try:
                read.append(self.vl.read_image(path))
            except (OSError, RuntimeError) as err:
                return [], f"source image '{path}' cannot be read ({type(err).__name__}: {err})"
        return read, None

    def _conversation(self, instruction: str, n_images: int, history: list[tuple[str, str]]) -> str:
        user = IMAGE_SLOT * n_images + f"Instruction: {instruction}"
        if not n_images:
            user += "\n(No input image: this is a text-to-image generation request.)"
        text = _turn("system", self.system) + _turn("user", user)
        for answer, reason in history:
            text += _turn("assistant", answer) + _turn("user", RETRY_REQUEST.format(reason=reason))
        return text + "<|im_start|>assistant\n"

    # -- annotation ------------------------------------------------------------------------------
    def _flagged(self, answers: list[str], problem: str) -> Annotation:
        return Annotation(tags={level: [] for level in self.schema.levels}, raw={"answers": answers}, problem=problem)

    def _finish(self, answers: list[str]) -> Annotation:
        try:
            return Annotation(tags=parse_answer(answers[-1], self.schema), raw={"answers": answers})
        except AnswerError as err:
            return self._flagged(answers, f"invalid answer after {len(answers)} attempt(s): {err}")

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        results: list[Annotation | None] = [None] * len(requests)
        todo = []  # [index, cache key, images, history of (answer, reason)]
        for i, request in enumerate(requests):
            read, problem = self._read_sources(request.sources)
            if problem:
                results[i] = self._flagged([], problem)
                continue
            key = content_key(
                self._fingerprint, self.system, request.instruction, *[data for data, _ in read],
                f"{self.max_new_tokens}/{self.retries}/{self.max_pixels}",
            )
            cached = self.cache.get(key)
            if cached is not None:
                results[i] = self._finish(cached["answers"])
            else:
                todo.append([i, key, [image for _, image in read], []])
        pending = todo
        for _ in range(1 + self.retries):
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                texts = [self._conversation(requests[i].instruction, len(images), history) for i, _, images, history in batch]
                answers = self._generate(texts, [image for _, _, images, _ in batch for image in images])
                for item, answer in zip(batch, answers):
                    try:
                        parse_answer(answer, self.schema)
                        item[3].append((answer, ""))
                    except AnswerError as err:
                        item[3].append((answer, str(err)))
            pending = [item for item in pending if item[3][-1][1]]  # still invalid: retry with the reason
            if not pending:
                break
        for i, key, _, history in todo:
            answers = [answer for answer, _ in history]
            self.cache.put(key, {"answers": answers})
            results[i] = self._finish(answers)
        return results  # type: ignore[return-value]
