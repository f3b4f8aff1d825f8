"""A small bundled demo dataset: synthetic pictures of coloured shapes, in the upstream MiniCPM-V format.

`python -m finetune.demo_data OUT_DIR [--num N] [--eval-num M] [--seed S]` writes

    OUT_DIR/images/*.png     coloured shapes on plain backgrounds, 60..400 px, a few wide / tall ones
    OUT_DIR/train.json       [{"id", "image", "conversations": [{"role", "content"}, ...]}, ...]
    OUT_DIR/eval.json

Every answer can be learnt from the picture (shape, colour, background, position) or, for the text-only
samples, from the question itself (small sums, colour facts). Image sizes are chosen so that at the tiny
model's scale_resolution of 112 some images are sliced and some are not (and some are upscaled). One training
sample uses two images with the upstream multi-image syntax: `"image": {"<image_00>": path, "<image_01>": path}`
and `<image_00>` / `<image_01>` markers in the text. Everything is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (150, 150, 150),
    "pink": (250, 200, 210),
}
# (width, height). At scale_resolution 112 (12,544 px) the first four are single views (small ones upscaled),
# the rest are sliced; the last four are wide / tall.
SIZES = (
    (60, 60), (90, 70), (100, 100), (112, 100), (150, 120), (200, 200), (260, 150), (300, 300),
    (400, 400), (400, 120), (110, 380), (320, 90), (80, 300),
)  # fmt: skip
POSITIONS = ("left", "centre", "right")

SHAPE_QUESTIONS = (
    "What shape is in the picture?",
    "Which shape do you see?",
    "Describe the shape in the image.",
)
COLOUR_QUESTIONS = ("What colour is the shape?", "Which colour does the shape have?")
BACKGROUND_QUESTIONS = ("And what colour is the background?", "What is the colour of the background?")
POSITION_QUESTIONS = ("Where is the shape: on the left, in the centre or on the right?",)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Text used only for the tokenizer (chat template words, a little general English and other scripts).
EXTRA_CORPUS = (
    "system", "user", "assistant", "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. Pictures, shapes and colours!",
    "Hello world\n\nThis is a test: 1, 2, 3 ... 10, 100, 1000.",
    "你好，世界。这是一个圆形。", "Ceci est un carré rouge. Das ist ein blaues Dreieck.",
)  # fmt: skip


@dataclass
class ImageSpec:
    name: str
    size: tuple[int, int]
    shape: str
    colour: str
    background: str
    position: str
    seed: int
    radius: float | None = None  # the shape's size as a fraction of the shorter side; None: drawn from the seed


@dataclass
class Sample:
    id: str
    conversations: list[dict[str, str]]
    images: list[ImageSpec] = field(default_factory=list)

    def to_json(self) -> dict:
        record: dict = {"id": self.id}
        if len(self.images) == 1:
            record["image"] = f"images/{self.images[0].name}"
        elif self.images:
            record["image"] = {f"<image_{k:02d}>": f"images/{spec.name}" for k, spec in enumerate(self.images)}
        record["conversations"] = self.conversations
        return record


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _image_spec(rng: random.Random, name: str, index: int) -> ImageSpec:
    width, height = SIZES[index % len(SIZES)]
    jitter = rng.randint(-6, 6)
    width, height = max(60, min(400, width + jitter)), max(60, min(400, height + jitter))
    background = rng.choice(list(BACKGROUNDS))
    return ImageSpec(
        name=name,
        size=(width, height),
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        background=background,
        position=rng.choice(POSITIONS),
        seed=rng.randrange(2**31),
    )


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _image_sample(rng: random.Random, sample_id: str, spec: ImageSpec, kind: int) -> Sample:
    described = f"{_article(spec.colour)} {spec.colour} {spec.shape}."
    if kind == 0:  # shape (and colour) in one turn
        turns = [_turn("user", "<image>\n" + rng.choice(SHAPE_QUESTIONS)), _turn("assistant", described)]
    elif kind == 1:  # colour only
        turns = [_turn("user", "<image>\n" + rng.choice(COLOUR_QUESTIONS)), _turn("assistant", f"It is {spec.colour}.")]
    elif kind == 2:  # multi-turn: shape, then background
        turns = [
            _turn("user", "<image>\n" + rng.choice(SHAPE_QUESTIONS)),
            _turn("assistant", described),
            _turn("user", rng.choice(BACKGROUND_QUESTIONS)),
            _turn("assistant", f"The background is {spec.background}."),
        ]
    else:  # multi-turn: colour, then position
        where = "in the centre" if spec.position == "centre" else f"on the {spec.position}"
        turns = [
            _turn("user", rng.choice(COLOUR_QUESTIONS) + "\n<image>"),
            _turn("assistant", f"It is {spec.colour}."),
            _turn("user", rng.choice(POSITION_QUESTIONS)),
            _turn("assistant", f"The {spec.shape} is {where}."),
        ]
    return Sample(sample_id, turns, [spec])


def _text_sample(rng: random.Random, sample_id: str) -> Sample:
    if rng.random() < 0.6:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        question = f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"
        answer = f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
        return Sample(sample_id, [_turn("user", question), _turn("assistant", answer)])
    shape = rng.choice(SHAPES)
    corners = {
        "circle": "no",
        "square": "four",
        "triangle": "three",
        "diamond": "four",
        "star": "ten",
        "cross": "twelve",
    }[shape]
    question = f"How many corners does a {shape} have?"
    answer = f"A {shape} has {corners} corners."
    return Sample(sample_id, [_turn("user", question), _turn("assistant", answer)])


def _multi_image_sample(rng: random.Random, sample_id: str, first: ImageSpec, second: ImageSpec) -> Sample:
    # Make the two pictures differ in shape so that the question has one answer.
    if second.shape == first.shape:
        second.shape = SHAPES[(SHAPES.index(first.shape) + 1) % len(SHAPES)]
    question = f"<image_00>\n<image_01>\nWhich picture shows a {first.shape}, the first or the second?"
    answer = f"The first picture shows a {first.shape}; the second shows {_article(second.colour).lower()} {second.colour} {second.shape}."
    turns = [
        _turn("user", question),
        _turn("assistant", answer),
        _turn("user", "What colour is the shape in the second picture?"),
        _turn("assistant", f"It is {second.colour}."),
    ]
    return Sample(sample_id, turns, [first, second])


def demo_samples(num_train: int = 64, num_eval: int = 16, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """The samples (text and image specs, no pixels) of the demo dataset: (train, eval)."""
    rng = random.Random(seed)
    image_counter = 0

    def next_spec() -> ImageSpec:
        nonlocal image_counter
        spec = _image_spec(rng, f"img_{image_counter:04d}.png", image_counter)
        image_counter += 1
        return spec

    def split(prefix: str, count: int, with_multi_image: bool) -> list[Sample]:
        samples: list[Sample] = []
        for i in range(count):
            sample_id = f"{prefix}_{i:04d}"
            if with_multi_image and i == 5:
                samples.append(_multi_image_sample(rng, sample_id, next_spec(), next_spec()))
            elif i % 8 == 7:  # one in eight is text-only
                samples.append(_text_sample(rng, sample_id))
            else:
                samples.append(_image_sample(rng, sample_id, next_spec(), kind=i % 4))
        return samples

    train = split("train", num_train, with_multi_image=num_train > 5)
    evaluation = split("eval", num_eval, with_multi_image=False)
    return train, evaluation


def demo_corpus(num_train: int = 64, num_eval: int = 16, seed: int = 0) -> list[str]:
    """Every text of the demo dataset (plus a few general lines): what a demo tokenizer trains merges on."""
    train, evaluation = demo_samples(num_train, num_eval, seed)
    texts = [turn["content"] for sample in train + evaluation for turn in sample.conversations]
    return texts + list(EXTRA_CORPUS)


def draw_image(spec: ImageSpec) -> Image.Image:
    """The picture an ImageSpec describes: one shape, drawn deterministically."""
    rng = random.Random(spec.seed)
    width, height = spec.size
    image = Image.new("RGB", spec.size, BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    radius = side * rng.uniform(0.28, 0.38)
    if spec.radius is not None:
        radius = side * spec.radius
    column = {"left": 0.25, "centre": 0.5, "right": 0.75}[spec.position]
    cx = min(max(width * column, radius + 2), width - radius - 2)
    cy = height / 2 + rng.uniform(-0.1, 0.1) * (height - 2 * radius)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=fill)
    elif spec.shape == "diamond":
        draw.polygon(
            [(cx, cy - radius), (cx + radius * 0.75, cy), (cx, cy + radius), (cx - radius * 0.75, cy)], fill=fill
        )
    elif spec.shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # cross
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
    return image


def write_demo_dataset(out_dir: str | Path, num_train: int = 64, num_eval: int = 16, seed: int = 0) -> dict[str, Path]:
    """Write images/, train.json and eval.json under out_dir; returns their paths."""
    return write_samples(out_dir, *demo_samples(num_train, num_eval, seed))


# --- the demo's learning task: colour and shape ---------------------------------------------------------------

# Questions whose answer needs the picture: "<colour> <shape>", two words (two tokens of the demo tokenizer), so
# that a tiny model fine-tuned for a minute or two on a CPU can learn to read it off the image.
COLOUR_SHAPE_QUESTIONS = (
    "What colour and shape is this?",
    "Which coloured shape do you see?",
    "Name the colour and the shape.",
)
COLOUR_SHAPE_BACKGROUNDS = ("white", "grey")
# Shape size as a fraction of the side: narrow, so that the coloured area itself tells the shapes apart.
COLOUR_SHAPE_RADIUS = (0.34, 0.38)
COLOUR_SHAPE_SIZE = 112  # the tiny model's scale_resolution: every picture is one view, neither sliced nor scaled


def colour_shape_samples(num_train: int = 1200, num_eval: int = 36, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """The demo's learning task: one picture, one question, the answer "<colour> <shape>" (e.g. "red star").

    Training cycles through every colour x shape pair (36) in a shuffled order, so each is seen about equally
    often; the held-out set covers every pair once per 36 samples, with pictures that are new renders (their own
    seeds: size within COLOUR_SHAPE_RADIUS, background, vertical offset; the shape is centred) of the
    same vocabulary, never copies of training images.
    A base model cannot answer these without seeing the picture; a fine-tuned one must read colour and shape."""
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]

    def split(prefix: str, count: int) -> list[Sample]:
        samples: list[Sample] = []
        order: list[tuple[str, str]] = []
        for i in range(count):
            if not order:
                order = rng.sample(pairs, len(pairs))
            colour, shape = order.pop()
            spec = ImageSpec(
                name=f"{prefix}_{i:04d}.png",
                size=(COLOUR_SHAPE_SIZE, COLOUR_SHAPE_SIZE),
                shape=shape,
                colour=colour,
                background=rng.choice(COLOUR_SHAPE_BACKGROUNDS),
                position="centre",
                seed=rng.randrange(2**31),
                radius=rng.uniform(*COLOUR_SHAPE_RADIUS),
            )
            question = "<image>\n" + rng.choice(COLOUR_SHAPE_QUESTIONS)
            turns = [_turn("user", question), _turn("assistant", f"{colour} {shape}")]
            samples.append(Sample(f"{prefix}_{i:04d}", turns, [spec]))
        return samples

    return split("train", num_train), split("eval", num_eval)


def write_samples(out_dir: str | Path, train: list[Sample], evaluation: list[Sample]) -> dict[str, Path]:
    """Draw every sample's pictures into out_dir/images and write train.json / eval.json; returns their paths."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for sample in train + evaluation:
        for spec in sample.images:
            draw_image(spec).save(out_dir / "images" / spec.name, optimize=False, compress_level=1)
    paths = {"train": out_dir / "train.json", "eval": out_dir / "eval.json", "images": out_dir / "images"}
    for key, samples in (("train", train), ("eval", evaluation)):
        paths[key].write_text(json.dumps([s.to_json() for s in samples], indent=2, ensure_ascii=False) + "\n")
    return paths


TASKS = ("mixed", "colour-shape")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write images/, train.json and eval.json into")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="mixed",
        help="mixed: every data feature (multi-turn, text-only, multi-image, sliced images); "
        "colour-shape: the demo's learning task, one question whose answer is '<colour> <shape>'",
    )
    parser.add_argument(
        "--num", type=int, default=None, help="number of training samples (default 64; colour-shape 1200)"
    )
    parser.add_argument(
        "--eval-num", type=int, default=None, help="number of eval samples (default num // 4; colour-shape 36)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.task == "colour-shape":
        args.num = args.num if args.num is not None else 1200
        num_eval = args.eval_num if args.eval_num is not None else 36
        paths = write_samples(args.out_dir, *colour_shape_samples(args.num, num_eval, args.seed))
    else:
        args.num = args.num if args.num is not None else 64
        num_eval = args.eval_num if args.eval_num is not None else max(1, args.num // 4)
        paths = write_demo_dataset(args.out_dir, args.num, num_eval, args.seed)
    images = sorted(paths["images"].glob("*.png"))
    print(f"wrote {paths['train']} ({args.num} samples), {paths['eval']} ({num_eval} samples), "
          f"{len(images)} images in {paths['images']}")  # fmt: skip


if __name__ == "__main__":
    main()
