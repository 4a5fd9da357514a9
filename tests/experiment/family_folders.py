"""Tiny model folders and task data on disk, for ``epmq run`` on a user's config.

For each family (``bert``, ``clip``, ``t5``, ``llama``) :func:`build_family` writes a tiny base
model built from a config, two experts (the base with its blocks perturbed) and their heads,
and returns what the config needs. Task labels are each expert's own predictions on its task
(computed here with the model code directly), so every expert scores exactly 100% on its own
task: the pipeline's expert row checks that data, heads and evaluation line up.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

WORDS = [
    "red", "green", "blue", "cat", "dog", "bird", "fast", "slow", "big", "small",
    "river", "stone", "tree", "sun", "moon", "rain", "happy", "sad", "old", "new",
]  # fmt: skip
CLASSES = ("alpha", "beta", "gamma")
TEMPLATES = ["a photo of a {}", "a {}"]  # no full stop: the word-level tokenizer keeps "cat." whole
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
N_TRAIN, N_CALIB, N_TEST = 16, 8, 16
POOL = 120  # candidate inputs per task, of which the clearest N_TRAIN + N_CALIB + N_TEST are kept


@dataclass
class Family:
    """What :func:`build_family` wrote: folders, per-task examples and the config parts."""

    name: str
    base: Path
    experts: dict[str, Path]  # task -> expert folder
    modality: str
    splits: dict[str, dict[str, tuple[list[Any], list[int]]]] = field(default_factory=dict)
    task_fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra task config


def texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def images(seed: int, n: int) -> np.ndarray:
    """``n`` random 32×32 RGB images (uint8), already at the model's size: a random colour per
    image plus noise, so that images differ as much as texts do."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 255, (n, 1, 1, 3))
    noise = rng.normal(0, 40, (n, 32, 32, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def pixel_values(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def word_tokenizer(specials: Sequence[str], template: str | None, **tokens: str) -> Any:
    vocab = {w: i for i, w in enumerate([*specials, *WORDS, *CLASSES, "a", "photo", "of"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        used = [s for s in specials if s in template]
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)


def perturbed(model: nn.Module, seed: int, marker: str) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=gen))
    return model.eval()


def linear_head(width: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(width, len(CLASSES))
    with torch.no_grad():
        head.weight.mul_(30.0)  # spread the logits so the labels use every class
    return head.eval()


def save_head(folder: Path, head: nn.Linear) -> None:
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        str(folder / "head.safetensors"),
    )


def centred_head(width: int, seed: int, features: torch.Tensor) -> nn.Linear:
    """A random linear head whose logits are centred on ``features``, so every class wins on
    some inputs."""
    head = linear_head(width, seed)
    with torch.no_grad():
        head.bias.copy_(-(features.float().mean(0) @ head.weight.T))
    return head


def best_words(scores: torch.Tensor, k: int = len(CLASSES)) -> list[int]:
    """The ``k`` candidate columns of ``scores`` [inputs, candidates] whose argmax spreads the
    inputs most evenly over them (maximal smallest class)."""
    from itertools import combinations

    best, best_count = list(range(k)), -1
    for combo in combinations(range(scores.shape[1]), k):
        counts = torch.bincount(scores[:, list(combo)].argmax(1), minlength=k)
        if int(counts.min()) > best_count:
            best, best_count = list(combo), int(counts.min())
    return best


def clearest(inputs: list[Any], scores: torch.Tensor) -> dict[str, tuple[list[Any], list[int]]]:
    """Keep the inputs whose predicted class wins by the widest margin, drawn round-robin over
    the classes so each class is represented, and cut them into train / calib / test."""
    top = scores.float().topk(2, dim=1).values
    margin = (top[:, 0] - top[:, 1]).tolist()
    labels = scores.argmax(1).tolist()
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(inputs)), key=lambda i: -margin[i]):
        by_class.setdefault(labels[i], []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    while len(chosen) < N_TRAIN + N_CALIB + N_TEST:
        for queue in queues:
            if queue and len(chosen) < N_TRAIN + N_CALIB + N_TEST:
                chosen.append(queue.pop(0))
    random.Random(0).shuffle(chosen)
    return _splits([inputs[i] for i in chosen], [labels[i] for i in chosen])


# -- families ---------------------------------------------------------------------------------
def build_bert(root: Path, tasks: Sequence[str]) -> Family:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = BertModel(config, add_pooling_layer=False).eval()
    tok = word_tokenizer(["[PAD]", "<unk>", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", pad_token="[PAD]")
    family = Family("bert", root / "base", {}, "text")
    base.save_pretrained(family.base)
    tok.save_pretrained(family.base)
    for number, task in enumerate(tasks):
        expert = BertModel(config, add_pooling_layer=False)
        expert.load_state_dict(base.state_dict())
        perturbed(expert, number + 1, ".layer.")
        inputs = texts(10 + number, POOL)
        enc = tok(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = expert(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            features = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling over real tokens
            head = centred_head(32, 100 + number, features)
            scores = head(features)
        folder = root / f"expert_{task}"
        expert.save_pretrained(folder)
        tok.save_pretrained(folder)
        save_head(folder, head)
        family.experts[task] = folder
        family.splits[task] = clearest(inputs, scores)
    return family


def build_clip(root: Path, tasks: Sequence[str], *, head_files: bool = False) -> Family:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from epmq.models.clip import image_features, zero_shot_head

    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=40, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    tok = word_tokenizer(
        ["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A <eos>",
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
    )  # fmt: skip
    family = Family("clip", root / "base", {}, "image")
    base.save_pretrained(family.base)
    tok.save_pretrained(family.base)
    (family.base / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": MEAN,
                "image_std": STD,
                "do_convert_rgb": True,
            }
        )
    )
    for number, task in enumerate(tasks):
        expert = CLIPVisionModel.from_pretrained(str(family.base))
        perturbed(expert, number + 1, ".layers.")
        folder = root / f"expert_{task}"
        expert.save_pretrained(folder)
        inputs = list(images(10 + number, POOL))
        with torch.no_grad():
            features = image_features(
                expert, pixel_values(np.stack(inputs)), base.visual_projection
            )
            if head_files:
                head = centred_head(16, 100 + number, features)
                save_head(folder, head)
                scores = head(features)
            else:  # zero-shot: the class names are the vocabulary words that split the images
                words = [w for w in WORDS if w != "a"]
                candidates = zero_shot_head(base, tok, words, TEMPLATES)
                chosen = best_words(candidates(features))
                names = [words[i] for i in chosen]
                family.task_fields[task] = {"label_words": names, "templates": TEMPLATES}
                scores = zero_shot_head(base, tok, names, TEMPLATES)(features)
        family.experts[task] = folder
        family.splits[task] = clearest(inputs, scores)
    return family


def build_t5(root: Path, tasks: Sequence[str]) -> Family:
    from transformers import T5Config, T5ForConditionalGeneration

    from epmq.models.t5 import label_word_log_likelihoods

    config = T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(config).eval()
    tok = word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    return _generative(
        "t5", root, tasks, base, tok, ".block.", label_word_log_likelihoods, "{text}"
    )


def build_llama(root: Path, tasks: Sequence[str]) -> Family:
    from transformers import LlamaConfig, LlamaForCausalLM

    from epmq.models.llama import continuation_log_likelihoods

    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    tok = word_tokenizer(["<pad>", "</s>", "<s>", "<unk>"], "<s> $A", pad_token="<pad>",
                         bos_token="<s>", eos_token="</s>")  # fmt: skip

    def score(model: nn.Module, tok: Any, prompts: list[str], words: list[str]) -> Any:
        return continuation_log_likelihoods(model, tok, prompts, [f" {w}" for w in words])

    return _generative("llama", root, tasks, base, tok, ".layers.", score, "{text}\nAnswer:")


def _generative(
    name: str,
    root: Path,
    tasks: Sequence[str],
    base: nn.Module,
    tok: Any,
    marker: str,
    score: Callable[..., torch.Tensor],
    prompt: str,
) -> Family:
    family = Family(name, root / "base", {}, "text")
    base.save_pretrained(family.base)
    tok.save_pretrained(family.base)
    for number, task in enumerate(tasks):
        expert = type(base)(base.config)
        expert.load_state_dict(base.state_dict())
        perturbed(expert, number + 1, marker)
        folder = root / f"expert_{task}"
        expert.save_pretrained(folder)
        family.experts[task] = folder
        inputs = texts(10 + number, POOL)
        prompts = [prompt.replace("{text}", t) for t in inputs]
        with torch.no_grad():  # the label words: the vocabulary words that split the inputs
            candidates = score(expert, tok, prompts, WORDS)
        chosen = best_words(candidates)
        family.task_fields[task] = {"label_words": [WORDS[i] for i in chosen]}
        family.splits[task] = clearest(inputs, candidates[:, chosen])
    return family


def _splits(inputs: list[Any], labels: list[int]) -> dict[str, tuple[list[Any], list[int]]]:
    a, b = N_TRAIN, N_TRAIN + N_CALIB
    return {
        "train": (inputs[:a], labels[:a]),
        "calib": (inputs[a:b], labels[a:b]),
        "test": (inputs[b:], labels[b:]),
    }


BUILDERS = {"bert": build_bert, "clip": build_clip, "t5": build_t5, "llama": build_llama}


# -- data on disk -----------------------------------------------------------------------------
def write_data(family: Family, task: str, fmt: str, root: Path) -> Path:
    """Write ``task``'s splits in format ``fmt`` under ``root``; returns the config's ``data``.

    Text labels are written as class names in CSV, as integers elsewhere; every format but
    ``csv`` also carries the calibration split.
    """
    splits = family.splits[task]
    root.mkdir(parents=True, exist_ok=True)
    if fmt in ("csv", "jsonl"):
        for split, (inputs, labels) in splits.items():
            if fmt == "csv" and split == "calib":
                continue
            rows = [{"text": x, "label": CLASSES[y] if fmt == "csv" else y}
                    for x, y in zip(inputs, labels, strict=True)]  # fmt: skip
            _write_rows(root / f"{split}.{fmt}", rows, fmt)
        return root
    if fmt == "npz":
        arrays = {}
        for split, (inputs, labels) in splits.items():
            arrays[f"x_{split}"] = (
                np.stack(inputs) if family.modality == "image" else np.array(inputs)
            )
            arrays[f"y_{split}"] = np.array(labels)
        np.savez(root / "data.npz", **arrays)
        return root / "data.npz"
    if fmt == "imagefolder":
        from PIL import Image

        for split, (inputs, labels) in splits.items():
            for i, (x, y) in enumerate(zip(inputs, labels, strict=True)):
                folder = root / split / CLASSES[y]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(folder / f"{i:03d}.png")
            for name in CLASSES:  # every class folder exists, even when no example has it
                (root / split / name).mkdir(parents=True, exist_ok=True)
        return root
    if fmt == "hf_disk":
        import datasets

        column = "image" if family.modality == "image" else "text"
        feature = datasets.Image() if family.modality == "image" else datasets.Value("string")
        features = datasets.Features(
            {column: feature, "label": datasets.ClassLabel(names=list(CLASSES))}
        )
        from PIL import Image

        parts = {}
        for split, (inputs, labels) in splits.items():
            values = [Image.fromarray(x) for x in inputs] if family.modality == "image" else inputs
            parts["calibration" if split == "calib" else split] = datasets.Dataset.from_dict(
                {column: values, "label": labels}, features=features
            )
        datasets.DatasetDict(parts).save_to_disk(str(root))
        return root
    raise ValueError(fmt)


def _write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def write_project(root: Path, tasks: Sequence[str], **settings: Any) -> dict[str, Any]:
    """A user's BERT project in ``root``: base, one expert per task, jsonl data and ``run.yaml``
    (relative paths) with ``settings`` (``quantization``, ``output``) over the defaults below;
    returns the config written."""
    import yaml

    family = BUILDERS["bert"](root, tasks)
    entries = []
    for task in tasks:
        write_data(family, task, "jsonl", root / "data" / task)
        entries.append({"name": task, "data": f"data/{task}", "format": "jsonl",
                        "classes": list(CLASSES), "calib_size": 4})  # fmt: skip
    config = {
        "base": {"path": "base"},
        "experts": [{"name": t, "path": f"expert_{t}", "task": t} for t in tasks],
        "tasks": entries,
        "merges": [{"method": "task_arithmetic", "params": {"scale": 0.5}}],
        "quantization": {"methods": ["rtn"], "bits": [8]},
        "output": {"dir": "report"},
        **settings,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return config
