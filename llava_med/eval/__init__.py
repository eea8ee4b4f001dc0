"""Evaluation: LLaVA-Med's benchmarks, locally or spread over a serving stack's workers.

* :mod:`~llava_med.eval.model_vqa`: answer a question file (JSONL ``{question_id, image, text}``) into an answers
  file, batched in-process on the worker's engine or through a controller; resumable, errors recorded per answer.
* :mod:`~llava_med.eval.vqa_metrics`: closed accuracy and open recall / exact match / token F1 of an answers file
  against VQA-RAD / SLAKE / PathVQA style ground truth, joined by ``question_id`` (``--compat-v1``: the v1.0 formulas).
* :mod:`~llava_med.eval.chat_judge` and :mod:`~llava_med.eval.summarize_judge`: the LLaVA-Med Bench review by a judge
  model behind any OpenAI-compatible endpoint, and its summary table.

Each runs as ``llava-med eval NAME ...`` or ``python -m llava_med.eval.NAME ...``. Only the local mode of
``model_vqa`` imports torch.
"""
