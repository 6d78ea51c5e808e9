"""Task-tag annotators: schema rules, a local Qwen2.5-VL, agreement between annotations, the `annotate` command.

Nothing here imports Lightning; the VLM path imports transformers only when it loads the model.
"""

from tagmoe_lit.tags.annotators.agreement import AgreementReport, agreement
from tagmoe_lit.tags.annotators.answer import AnswerError, build_prompt, parse_answer
from tagmoe_lit.tags.annotators.base import Annotation, AnnotationRequest, Annotator
from tagmoe_lit.tags.annotators.qwen_vl import QwenVLAnnotator
from tagmoe_lit.tags.annotators.rules import RuleAnnotator

__all__ = [
    "AgreementReport",
    "Annotation",
    "AnnotationRequest",
    "Annotator",
    "AnswerError",
    "QwenVLAnnotator",
    "RuleAnnotator",
    "agreement",
    "build_prompt",
    "parse_answer",
]
