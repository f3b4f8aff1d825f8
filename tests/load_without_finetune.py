"""Loads exported checkpoints with plain transformers in an interpreter that cannot import this project.

Run by tests/test_self_contained.py from a temporary directory (`python -I load_without_finetune.py JOBS RESULTS`):
a meta-path finder refuses every `finetune` import (the project may be installed editable in the venv), so the
checkpoint's own code files are all there is. For each job (a checkpoint, a `data` input saved with torch.save, an
image and a question; `chat_returns_context` for MiniCPM-V 2.0) it saves the logits of `model(data=...)`, the
greedy `chat` answer and the answers of the published chat snippets, with the classes transformers loaded; then
saves the model and tokenizer again with save_pretrained and loads that copy.
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class RefuseFinetune(importlib.abc.MetaPathFinder):
    """Every `finetune` / `finetune.*` import fails, wherever the package would be found."""

    def find_spec(self, name, path=None, target=None):
        if name == "finetune" or name.startswith("finetune."):
            raise ImportError(f"{name}: refused, the exported checkpoint must load without this project")
        return None


sys.meta_path.insert(0, RefuseFinetune())
try:
    import finetune  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("finetune is importable here: the check would prove nothing")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def published_snippet(path: str, image_path: str, returns_context: bool) -> list[str]:
    """The model card's chat snippets as written (the model on the CPU instead of 'cuda', short answers): 2.5 and
    2.6 sample, beam-search and stream; 2.0's README calls chat(image, msgs, context, tokenizer) for a tuple."""
    model = AutoModel.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float16)
    model = model.to(device="cpu")

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model.eval()

    image = Image.open(image_path).convert("RGB")
    question = "What is in the image?"
    msgs = [{"role": "user", "content": question}]

    if returns_context:
        res, context, _ = model.chat(
            image=image, msgs=msgs, context=None, tokenizer=tokenizer, sampling=True, temperature=0.7, max_new_tokens=8
        )
        return [res]

    answers = []
    res = model.chat(
        image=image,
        msgs=msgs,
        tokenizer=tokenizer,
        sampling=True,  # if sampling=False, beam_search will be used by default
        temperature=0.7,
        # system_prompt='' # pass system_prompt if needed
        max_new_tokens=8,
    )
    answers.append(res)
    res = model.chat(image=image, msgs=msgs, tokenizer=tokenizer, sampling=False, max_new_tokens=8)
    answers.append(res)
    res = model.chat(image=image, msgs=msgs, tokenizer=tokenizer, sampling=True, temperature=0.7, stream=True,
                     max_new_tokens=8)  # fmt: skip
    generated_text = ""
    for new_text in res:
        generated_text += new_text
    answers.append(generated_text)
    return answers


def run(job: dict) -> dict:
    path = job["checkpoint"]
    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    data = torch.load(job["data"], weights_only=True)
    with torch.no_grad():
        logits = model(data=data).logits[0]
    image = Image.open(job["image"]).convert("RGB")
    msgs = [{"role": "user", "content": job["question"]}]
    returns_context = job.get("chat_returns_context", False)  # MiniCPM-V 2.0's chat(image, msgs, context, ...)
    if returns_context:
        greedy, _, _ = model.chat(image=image, msgs=msgs, context=None, tokenizer=tokenizer, **job["greedy"])
    else:
        greedy = model.chat(image=image, msgs=msgs, tokenizer=tokenizer, **job["greedy"])
    # Saved again by transformers (what a user's own tool does after loading it), then loaded from that copy.
    model.save_pretrained(job["resave"])
    tokenizer.save_pretrained(job["resave"])
    again = AutoModel.from_pretrained(job["resave"], trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        resaved_logits = again(data=data).logits[0]
    return {
        "logits": logits,
        "greedy": greedy,
        "snippet": published_snippet(path, job["image"], returns_context),
        "classes": [f"{type(obj).__module__}.{type(obj).__name__}" for obj in (model, model.config, tokenizer)],
        "resaved_logits": resaved_logits,
        "resaved_auto_maps": [read_auto_map(job["resave"], name) for name in ("config.json", "tokenizer_config.json")],
    }


def read_auto_map(directory: str, name: str) -> dict:
    with open(f"{directory}/{name}") as handle:
        return json.load(handle)["auto_map"]


if __name__ == "__main__":
    jobs_path, results_path = sys.argv[1:]
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    results = {job["name"]: run(job) for job in jobs}
    results["finetune_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "finetune")
    torch.save(results, results_path)
