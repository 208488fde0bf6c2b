"""Chat with a trained checkpoint in the terminal.

    python -m trainer.chat_cli --run-dir runs/<id>                    # latest checkpoint of the most advanced stage
    python -m trainer.chat_cli --run-dir runs/<id> --stage base_train --step 500
    python -m trainer.chat_cli --run-dir runs/<id> -p "Why is the sky blue?"   # one answer, then exit

Chat checkpoints (mid/sft/rl) get the conversation format; a base checkpoint
continues raw text (completion mode). Tokens are printed as they come, and a
multi-byte character is printed only once all its bytes are there. Tool calls
the model makes (<|python_start|> ... <|python_end|>) and the calculator's
answers are shown in brackets. Type `clear` to start over, `quit` (or Ctrl-D)
to leave. The history is cut from the oldest turns to fit the context window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline import checkpoints
from gpt import checkpoint
from pipeline import stages
from gpt.engine import AnswerStream, Engine, fit_history
from gpt.tokenizer import ConversationError, Tokenizer



class Printer:
    """Prints an answer's tokens as they come, never splitting a UTF-8 character; tool calls in brackets.

    The splitting into parts and the holding back of incomplete characters are the engine's
    AnswerStream (the chat page uses the same); this adds only the terminal's brackets.
    """

    BRACKETS = {"python": (" [calculator: ", "]"), "python_output": (" [= ", "] ")}

    def __init__(self, tokenizer: Tokenizer, out=sys.stdout):
        self.tok, self.out = tokenizer, out
        self.stream = AnswerStream(tokenizer, completion=False)
        self.part = -1  # index of the part being printed

    def add(self, token: int) -> None:
        self.stream.add(token)
        self._write(self.stream.take_deltas())

    def finish(self) -> str:
        """Print what is left, close an open bracket; return the answer's text (all parts)."""
        self.parts = self.stream.finish()
        self._write(self.stream.take_deltas())
        self._close()
        self.out.flush()
        self.stream, self.part = AnswerStream(self.tok, completion=False), -1
        return "".join(p["text"] for p in self.parts)

    def _write(self, deltas) -> None:
        for index, kind, text in deltas:
            if index != self.part:
                self._close()
                self.part, self.kind = index, kind
                self.out.write(self.BRACKETS.get(kind, ("", ""))[0])
            self.out.write(text)
        self.out.flush()

    def _close(self) -> None:
        if self.part >= 0:
            self.out.write(self.BRACKETS.get(self.kind, ("", ""))[1])


def stream_answer(engine: Engine, tokenizer: Tokenizer, prompt: list[int], args, out=sys.stdout) -> list:
    """Generate one answer, printing it as it comes; return it as assistant message parts."""
    printer = Printer(tokenizer, out)
    for row in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        if not row or row[0] is None:  # the row has ended
            break
        token, _mask = row[0]
        if token in engine.stop_ids:
            break
        printer.add(token)
    printer.finish()
    out.write("\n")
    out.flush()
    return printer.parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a trained checkpoint in the terminal.")
    parser.add_argument("--run-dir", required=True, help="the run directory (with tokenizer/ and checkpoints/)")
    parser.add_argument("--stage", choices=stages.model_stages(), help="which stage's checkpoint (default: the most advanced)")
    parser.add_argument("--step", type=int, help="which step of that stage (default: its latest)")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--seed", type=int, default=42, help="random seed for sampling")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.max_tokens < 1 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0, --max-tokens >= 1, --top-k >= 0 and 0 < --top-p <= 1")

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    try:
        path = checkpoints.find(args.run_dir, args.stage, args.step)
        tokenizer = Tokenizer.from_dir(Path(args.run_dir) / "tokenizer")
    except (FileNotFoundError, OSError) as e:
        print(f"chat_cli: {e}", file=sys.stderr)
        return 2
    model, meta = checkpoint.load_for_inference(path, device)
    engine = Engine(model, tokenizer)
    stage = path.parent.name
    chat = stages.get(stage).chat_mode == "chat"
    context = model.config.sequence_len
    print(f"{stage} step {meta.get('step')} from {path} on {device}; "
          f"{'chat' if chat else 'completion (a base model continues your text)'} mode. 'clear' starts over, 'quit' leaves.",
          file=sys.stderr)

    messages: list[dict] = []
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("\n> " if chat else "\ntext> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if text.strip() in ("quit", "exit"):
                return 0
            if text.strip() == "clear":
                messages = []
                print("(history cleared)", file=sys.stderr)
                continue
            if not text.strip():
                continue
        budget = max(1, context - args.max_tokens)
        try:
            if chat:
                prompt, messages = fit_history(tokenizer, messages + [{"role": "user", "content": text}], budget)
            else:
                prompt = tokenizer.encode(text, prepend=tokenizer.bos_id)[-budget:]
                sys.stdout.write(text)
        except ConversationError as e:
            print(f"chat_cli: {e}", file=sys.stderr)
            return 2
        try:
            parts = stream_answer(engine, tokenizer, prompt, args)
        except KeyboardInterrupt:  # stop this answer, keep the session
            print("\n(stopped)", file=sys.stderr)
            parts = []
        if chat:
            messages.append({"role": "assistant", "content": parts or [{"type": "text", "text": ""}]})
        if args.prompt is not None:
            return 0


if __name__ == "__main__":
    sys.exit(main())
