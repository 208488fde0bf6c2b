"""HumanEval: 164 Python functions to complete, graded by running their tests in the sandbox.

    from tasks import humaneval
    records = humaneval.load()                             # 164 records, shuffled with seed 42
    code = humaneval.extract_code(model_answer)            # first ```python block, else the whole answer
    result = humaneval.run(records[0], code)               # gpt.sandbox.SandboxResult; passed = result.ok
    results = humaneval.run_many([(r, c), ...], workers=8) # same, a bounded pool, results in input order

Records: {task_id, prompt, canonical_solution, test, entry_point} as
published. The user message is the prompt (imports, signature, docstring);
the model is expected to answer with the whole function. The program run is
the prompt's leading imports, the completion, the test code (which defines
`check`) and `check(<entry_point>)`; it passes when it exits with status 0
within the time limit (5 s) and memory limit (256 MB of address space).
conversation() answers with prompt + canonical_solution, which passes.

File: humaneval/HumanEval.jsonl.gz in the mirror; upstream openai/human-eval
at a pinned commit.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from gpt import sandbox
from tasks import common

URL = "https://raw.githubusercontent.com/openai/human-eval/6d43fb980f9fee3c892a914eda09951f772ad10d/data/HumanEval.jsonl.gz"
SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"  # the .gz as published
TIMEOUT = 5.0
MEMORY_MB = 256
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

# A fence opening with python/py (or no language), up to the closing fence or the end of the text.
CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load(max_problems: int | None = None, seed: int | None = 42) -> list[dict]:
    """The problems; see tasks/common.py for the shuffle and cut (seed None: HumanEval/0 first)."""
    rows = common.read_jsonl("humaneval/HumanEval.jsonl.gz", URL, SHA256)
    return common.subset(({k: row[k] for k in FIELDS} for row in rows), max_problems, seed)


def extract_code(answer: str) -> str:
    """The first fenced python block's contents (an unclosed one runs to the end), else the whole answer."""
    match = CODE_BLOCK.search(answer)
    return match.group(1) if match else answer


def leading_imports(prompt: str) -> str:
    """The import lines at the top of the prompt, before its first other statement."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def program(record: dict, completion: str) -> str:
    """The program whose exit status grades `completion`."""
    pieces = [leading_imports(record["prompt"]), completion, record["test"], f"check({record['entry_point']})"]
    return "\n\n".join(pieces) + "\n"


def run(record: dict, completion: str, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB) -> sandbox.SandboxResult:
    return sandbox.run(program(record, completion), timeout=timeout, memory_mb=memory_mb)


def run_many(pairs, workers: int | None = None, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB) -> list[sandbox.SandboxResult]:
    """run() over (record, completion) pairs, at most `workers` at a time (default: CPUs, up to 8), in order."""
    pairs = list(pairs)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pair: run(pair[0], pair[1], timeout, memory_mb), pairs))


def conversation(record: dict, with_answer: bool = False) -> dict:
    """The prompt as the user message; with_answer, the reference function as the assistant's."""
    messages = [{"role": "user", "content": record["prompt"]}]
    if with_answer:
        messages.append({"role": "assistant", "content": record["prompt"] + record["canonical_solution"]})
    return {"messages": messages}
