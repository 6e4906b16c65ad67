"""The Dolly v2 fine-tuning recipe: data, prompt format, HF Trainer script, generation.

Runs without Metaflow: ``python -m training.trainer --help``.
"""
