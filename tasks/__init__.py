"""Task datasets with their graders, shared by the training stages and the evaluations.

One module per dataset (tasks/core.py: the CORE few-shot tasks of base models; ARC, MMLU,
GSM8K, HumanEval and the chat sets beside it). Below the stages, above gpt/ and pipeline/
(DESIGN.md): a module here may import gpt/ and pipeline/ only.
"""
