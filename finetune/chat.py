"""Chat with MiniCPM-Llama3-V-2.5 or MiniCPM-V 2.6 (optionally with a LoRA adapter) from the command line; the
answer streams.

    python -m finetune.chat --model openbmb/MiniCPM-Llama3-V-2_5 --adapter output/output__lora \\
        --image photo.jpg [--image second.png] [--history conv.json] [--greedy [--beams 3]] \\
        [--max_new_tokens 512] [--device auto|cpu|cuda] [--dtype auto|bf16|fp16|fp32] "What is in the picture?"

Decoding: sampling with the published defaults (top_p 0.8, top_k 100, temperature 0.7, repetition_penalty
1.05) unless --greedy (do_sample False, num_beams 1, repetition_penalty 1.0). The published non-sampling
default of `chat()` is `--greedy --beams 3 --repetition_penalty 1.2`; beam search cannot stream, so with
--beams > 1 the answer is printed when complete.

--history: a JSON file with earlier turns, either a list of {"role", "content"} (training format; `<image>`
markers in user turns mark where the --image files go, in order; images without a marker go before the first
user text, as in training) or a whole training record {"image": ..., "conversations": [...]} whose images are
read from the record. The question is appended as the last user turn.

The prompt is the published inference prompt of the model's version (its tokenizer's chat template with the
assistant header: Llama-3's for 2.5, ChatML with the default system turn for 2.6; images as `(<image>./</image>)`
replaced by their placeholder text), built by `build_prompt`, which `finetune.evaluate` shares so that images and
contents are exactly what training wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import transformers
from PIL import Image
from transformers import TextStreamer

from finetune.cli import ArgumentParser, check_model_flags
from finetune.dataset import IMAGE_MARKER as TRAINING_MARKER  # the marker of the training data (chat() has its own)
from finetune.dataset import TRAINING_TEMPLATES, DataError, open_image, version_of_tokenizer
from finetune.model.chat_prompt import IMAGE_MARKER, PUBLISHED_SAMPLING, render_chat_prompt
from finetune.model.loading import DTYPES


class ChatError(ValueError):
    """A chat or evaluation request that cannot work (missing files, bad history); one line on the CLI."""


# --- loading -------------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChatError(f"--device {device}: CUDA is not available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ChatError(f"--dtype {dtype}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model_path: str,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
):
    """(model, tokenizer) ready for `generate`: the MiniCPMV itself, with the adapter's LoRA layers and trained
    modules injected when `adapter` is given (PeftModel, not merged: numerics as in training). The tokenizer comes
    from the adapter directory when it has one (the trainer copies the base's files there), else the model's."""
    from transformers import AutoModel, AutoTokenizer

    import finetune  # noqa: F401  (registers the native model with the Auto classes)

    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    if adapter is not None:
        adapter_path = Path(adapter)
        if not (adapter_path / "adapter_config.json").is_file():
            raise ChatError(f"--adapter {adapter}: no adapter_config.json there (expected a training output_dir)")
    if Path(model_path).exists() and not Path(model_path, "config.json").is_file():
        raise ChatError(f"--model {model_path}: no config.json: not a model directory")
    tokenizer_dir = adapter if adapter is not None and Path(adapter, "tokenizer_config.json").is_file() else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # On a GPU the weights load straight onto it (no full copy in host memory first).
    device_map = str(target) if target.type == "cuda" else None
    model = AutoModel.from_pretrained(
        model_path, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map
    )
    model.to(target)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).get_base_model()
    model.config.use_cache = True
    return model.eval(), tokenizer


def load_image(path: str | Path) -> Image.Image:
    """The image in RGB, read as the training data reads it (`finetune.dataset.open_image`)."""
    try:
        with open_image(str(path), sample=None) as image:
            return image.convert("RGB")
    except DataError as error:
        raise ChatError(error.reason) from None


# --- prompts -------------------------------------------------------------------------------------------------------


def build_prompt(
    tokenizer,
    messages: Sequence[tuple[str, str]],
    images: Sequence[tuple[str, Image.Image]] = (),
    system_prompt: str = "",
) -> tuple[str, list[Image.Image]]:
    """(role, content) turns + (marker, image) pairs -> (published inference prompt with markers, images in order).

    Placement is training's (finetune.dataset.ConversationEncoder): an image whose marker occurs in a turn goes
    exactly there (first unused occurrence); an image without a marker goes before the first user text followed
    by "\\n". Contents are stripped only where the version's training template strips them (2.5's Llama-3
    template trims every content; 2.6's ChatML keeps it as written). The template is applied by
    render_chat_prompt (the published one, ending with the assistant header)."""
    template = TRAINING_TEMPLATES[version_of_tokenizer(tokenizer).llm_type]
    contents = [content.strip() if template.strips_content else content for _, content in messages]
    roles = [role for role, _ in messages]
    if "user" not in roles:
        raise ChatError("the conversation has no user turn")
    first_user = roles.index("user")
    sentinel = "\x00{}\x00"
    leading: list[int] = []
    for k, (marker, _) in enumerate(images):
        holder = next((i for i, c in enumerate(contents) if marker and marker in c), None)
        if holder is None:
            leading.append(k)
        else:
            contents[holder] = contents[holder].replace(marker, sentinel.format(k), 1)
    if leading:
        contents[first_user] = "".join(sentinel.format(k) + "\n" for k in leading) + contents[first_user]
    order: list[int] = []
    for i, content in enumerate(contents):
        pieces = content.split("\x00")
        # odd pieces are image numbers
        order += [int(p) for p in pieces[1::2]]
        contents[i] = "".join(IMAGE_MARKER if j % 2 else p for j, p in enumerate(pieces))
    msgs = [{"role": role, "content": content} for role, content in zip(roles, contents, strict=True)]
    if msgs[0]["role"] == "system":  # render_chat_prompt wants the system prompt separately
        system_prompt, msgs = msgs[0]["content"], msgs[1:]
    prompt, _ = render_chat_prompt(None, msgs, tokenizer, system_prompt)
    return prompt, [images[k][1] for k in order]


def generation_config(greedy: bool, beams: int = 1, repetition_penalty: float | None = None) -> dict[str, Any]:
    """Sampling: the published defaults. Greedy: do_sample False with `beams` beams (1 = plain greedy)."""
    if not greedy:
        config = dict(PUBLISHED_SAMPLING)
        if repetition_penalty is not None:
            config["repetition_penalty"] = repetition_penalty
        return config
    return {
        "do_sample": False,
        "num_beams": beams,
        "repetition_penalty": 1.0 if repetition_penalty is None else repetition_penalty,
    }


class Streamer(TextStreamer):
    """TextStreamer that writes to `stream` (stdout by default) and keeps the text it wrote."""

    def __init__(self, tokenizer, stream: TextIO | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)
        out = self.stream if self.stream is not None else sys.stdout
        out.write(text + ("\n" if stream_end else ""))
        out.flush()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# --- conversations ------------------------------------------------------------------------------------------------


def load_history(path: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A history file -> (turns, (marker, image path) pairs from the record; empty for a plain list of turns)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatError(f"--history {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ChatError(f"--history {path}: malformed JSON at line {error.lineno}: {error.msg}") from None
    if isinstance(raw, dict):  # a training record: parse it exactly as training does
        from finetune.dataset import DataError, parse_record

        try:
            record = parse_record(raw, path.name, base_dir=str(path.resolve().parent))
        except DataError as error:
            raise ChatError(f"--history {path}: {error}") from None
        return list(record.messages), list(record.images)
    if not isinstance(raw, list):
        raise ChatError(f"--history {path}: expected a list of {{role, content}} or a training record")
    turns = []
    for k, turn in enumerate(raw):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ("system", "user", "assistant")
            or not isinstance(turn.get("content"), str)
        ):
            raise ChatError(f"--history {path}: turn {k} must be {{'role': system|user|assistant, 'content': str}}")
        turns.append((turn["role"], turn["content"]))
    return turns, []


def conversation(
    question: str, history: str | Path | None, image_paths: Sequence[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, Image.Image]]]:
    """Turns (history + the question) and (marker, image) pairs for build_prompt."""
    turns, record_images = load_history(history) if history else ([], [])
    if turns and turns[-1][0] == "user":
        raise ChatError("--history ends with a user turn: the question is the next user turn")
    turns = turns + [("user", question)]
    images = [(marker, load_image(p)) for marker, p in record_images]
    for p in image_paths:  # --image files fill `<image>` markers in order, then go before the first user text
        images.append((TRAINING_MARKER, load_image(p)))
    markers = sum(c.count(TRAINING_MARKER) for r, c in turns if r == "user")
    if markers and markers != sum(1 for m, _ in images if m == TRAINING_MARKER):
        raise ChatError(f"the conversation has {markers} <image> marker(s) but {len(image_paths)} --image file(s)")
    return turns, images


def chat(
    model,
    tokenizer,
    question: str,
    image_paths: Sequence[str] = (),
    history: str | Path | None = None,
    greedy: bool = False,
    beams: int = 1,
    repetition_penalty: float | None = None,
    max_new_tokens: int = 512,
    stream: TextIO | None = None,
    system_prompt: str = "",
) -> str:
    """Answer `question`, streaming to `stream` (stdout by default; beam search prints at the end). Returns it."""
    turns, images = conversation(question, history, image_paths)
    prompt, ordered = build_prompt(tokenizer, turns, images, system_prompt)
    config = generation_config(greedy, beams, repetition_penalty)
    if config.get("num_beams", 1) > 1:  # transformers' streamers do not support beam search
        answer = model.generate_text(prompt, ordered, tokenizer, max_new_tokens, **config)
        out = stream if stream is not None else sys.stdout
        out.write(answer + "\n")
        out.flush()
        return answer
    return model.generate_text(
        prompt, ordered, tokenizer, max_new_tokens, streamer=Streamer(tokenizer, stream), **config
    )


# --- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m finetune.chat", description="Chat with MiniCPM-Llama3-V-2.5 or MiniCPM-V 2.6 (+ LoRA adapter)."
    )
    parser.add_argument("question", help="the user's question")
    parser.add_argument("--model", required=True, help="base (or merged) model directory or hub id")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (the training output_dir)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--history", default=None, help="JSON file with earlier turns (see module docstring)")
    parser.add_argument("--greedy", action="store_true", help="no sampling (num_beams from --beams, default 1)")
    parser.add_argument(
        "--beams", type=int, default=1, help="beams with --greedy (published: 3, with --repetition_penalty 1.2)"
    )
    parser.add_argument("--repetition_penalty", type=float, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    return parser


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_flags("finetune.chat", args.model, args.adapter)  # one line, before any hub look-up
    transformers.utils.logging.disable_progress_bar()  # keep the terminal for the answers
    try:
        if args.beams > 1 and not args.greedy:
            raise ChatError("--beams > 1 needs --greedy (beam search does not sample)")
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model, tokenizer = load_model(args.model, args.adapter, args.device, args.dtype)
        chat(model, tokenizer, args.question, args.image, args.history, args.greedy, args.beams, args.repetition_penalty,
             args.max_new_tokens, system_prompt=args.system)  # fmt: skip
    except ValueError as error:  # ChatError and CheckpointError included: bad input, one line
        print(f"finetune.chat: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
