"""Finetuning: recipes, the loss, the resumable loop, data-parallel processes (bench/jobs/finetune.py runs it)."""
