"""GSM8K (grade-school math word problems), with the calculator as a tool.

    from tasks import gsm8k
    records = gsm8k.load("test")                        # 1,319 records, shuffled with seed 42 (train: 7,473)
    gsm8k.extract_answer("... #### 1,234")             # '1234'
    gsm8k.is_correct(completion, records[0])           # the completion's first '#### n' equals the answer
    gsm8k.conversation(records[0], with_answer=True)   # the worked solution with calculator calls

Records: {id, question, solution, answer}; `solution` is the reference worked
solution, `answer` its final number, normalised as below.

Answers. The first "#### <number>" in a text is its answer (a "$" may
precede the number); the number is normalised so that equal values compare
equal as strings: thousands commas and a leading "+" dropped, trailing
decimal zeros dropped ("24.0" -> "24", "2.50" -> "2.5"), "-0" -> "0". The
reference project compares the matched text with only the commas removed;
every reference answer in the data is an integer, so this only forgives a
model for writing "24.00".

Tool calls. The reference solutions mark each calculation as
"<<48/2=24>>"; with_answer turns each into a python part with the expression
("48/2") followed by a python_output part with the annotated result ("24"),
split at the last "=", as gpt/tokenizer.py renders tool calls: the model
learns to write the call, the output is masked (the engine inserts what
gpt/calculator.py returns). The text around the annotations, including the
final "#### n" line, becomes text parts. An annotation without "=" (none in
the data) is dropped.

Files: gsm8k/{train,test}.jsonl in the mirror; upstream openai/grade-school-math
at a pinned commit.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from tasks import common

SPLITS = ("train", "test")
URL = "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/{split}.jsonl"
SHA256 = {  # of the upstream files, as the data mirror's manifest.json records them
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}

ANSWER = re.compile(r"####\s*\$?\s*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))")
ANNOTATION = re.compile(r"<<(.*?)>>")


def load(split: str = "test", max_problems: int | None = None, seed: int | None = 42) -> list[dict]:
    """The records of one split; see tasks/common.py for the shuffle and cut."""
    common.check_choice("GSM8K split", split, SPLITS)
    rows = common.read_jsonl(f"gsm8k/{split}.jsonl", URL.format(split=split), SHA256[split])
    records = []
    for i, row in enumerate(rows):
        answer = extract_answer(row["answer"])
        if answer is None:
            raise ValueError(f"GSM8K {split} line {i + 1}: the solution has no '#### <number>'")
        records.append({"id": f"gsm8k/{split}/{i}", "question": row["question"], "solution": row["answer"], "answer": answer})
    return common.subset(records, max_problems, seed)


def normalise_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '+7' -> '7', '-0.0' -> '0'; text that is not a number comes back stripped of commas."""
    text = text.replace(",", "").strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised number after the first '####' that is followed by one, or None."""
    match = ANSWER.search(text)
    return normalise_number(match.group(1)) if match else None


def is_correct(completion: str, record: dict) -> bool:
    return extract_answer(completion) == record["answer"]


def solution_parts(solution: str) -> list[dict]:
    """The solution as assistant parts: text, and a python + python_output pair per annotation."""
    parts: list[dict] = []

    def text(t: str) -> None:
        if not t:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += t
        else:
            parts.append({"type": "text", "text": t})

    end = 0
    for match in ANNOTATION.finditer(solution):
        text(solution[end:match.start()])
        end = match.end()
        expr, eq, result = match.group(1).rpartition("=")
        if eq:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
    text(solution[end:])
    return parts


def conversation(record: dict, with_answer: bool = False) -> dict:
    """The question, and with_answer the solution with its calculator calls (for training)."""
    messages = [{"role": "user", "content": record["question"]}]
    if with_answer:
        messages.append({"role": "assistant", "content": solution_parts(record["solution"])})
    return {"messages": messages}
