"""The one record every reader yields and every task scores."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class EvalSample:
  """One benchmark question, ready for the model.

  prompt_text: the user turn without the think suffix (the task adds " /think" / " /no_think"
    when images are present, as the original does; the API adds the chat template and <image>s).
  images: in prompt order: readers.ImageRef (kept encoded; evaluate decodes a batch at a time) or PIL images.
  answers: ground truths; for multiple choice, the gold letter(s).
  choices: option texts for multiple choice (A, B, ... in order), else [].
  meta: task-specific fields used by scoring (category, question_type, index, pair_id, ...).
  """
  id: str
  prompt_text: str
  images: list
  answers: list[str]
  choices: list[str] = dataclasses.field(default_factory=list)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
