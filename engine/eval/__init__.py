"""Evaluation of a Flamingo model on the paper's tasks (`python -m engine eval`).

metrics   VQA accuracy (official normalisation), CIDEr / BLEU-4, repetition check
datasets  readers: the corpus's held-out split, COCO captions, VQAv2
shots     support selection: random (seeded) or RICES; shots spread over classes
scoring   media -> visual tokens, greedy decoding to <EOC>, cached candidate ranking, calibration
tasks     caption, vqa, classify, recognize, video_qa, dialogue, text
report    the contract JSON and the shots-vs-score plot
"""
from .tasks import TASKS, EvalSettings, default_shots, run_task

__all__ = ["TASKS", "EvalSettings", "default_shots", "run_task"]
