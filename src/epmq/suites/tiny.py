"""The ``tiny`` stand-in suite: a 2-layer, 32-wide BERT and two synthetic tasks.

Everything is built at first use from a config and a word list (no download, no Debian
package), so pipeline tests run in seconds on CPU. Both tasks read the same kind of sentence
(filler words, one or two topic words, one or two sentiment words), one labelling the topic
and the other the sentiment, so their experts pull the shared encoder in different
directions, as real experts do.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from epmq.atomic import output_dir
from epmq.models.folder import quiet_transformers
from epmq.suites.suite import TRAINING_DEFAULTS, Suite, apply_overrides, settings_key
from epmq.suites.task import Task, build_task, derived_seed

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOPICS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "owl", "fox", "cow", "bee", "frog"),
    "food": ("bread", "apple", "cheese", "soup", "rice", "pie", "plum", "egg"),
    "tool": ("hammer", "saw", "drill", "wrench", "rake", "axe", "file", "pliers"),
}
SENTIMENT: dict[str, tuple[str, ...]] = {
    "negative": ("bad", "awful", "sad", "poor", "ugly", "broken"),
    "positive": ("good", "great", "happy", "fine", "nice", "lovely"),
}
FILLER = (
    "the",
    "a",
    "is",
    "was",
    "very",
    "quite",
    "my",
    "your",
    "and",
    "with",
    "on",
    "near",
    "today",
    "again",
    "big",
    "small",
    "old",
    "new",
    "red",
    "blue",
    "seen",
    "there",
)
VOCAB: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *FILLER,
    *(w for ws in TOPICS.values() for w in ws),
    *(w for ws in SENTIMENT.values() for w in ws),
)

TINY_DEFAULTS: dict[str, Any] = {
    "suite": "tiny",
    "format": 1,
    "hidden": 32,
    "layers": 2,
    "n_train": 256,
    "n_calib": 32,
    "n_test": 96,
    **TRAINING_DEFAULTS,
    "steps": 80,
    "lr": 1e-2,
    "head_lr": 3e-2,
    "probe_steps": 100,
}
TINY_QUICK = {"steps": 20, "probe_steps": 50, "n_train": 128}


def build_tokenizer(folder: Path) -> Any:
    """A lower-casing WordPiece tokenizer over :data:`VOCAB`, saved into ``folder``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_base(folder: Path, *, hidden: int, layers: int, seed: int) -> Path:
    """Write a randomly initialised (seeded) tiny ``BertModel`` and its tokenizer."""
    from transformers import BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(derived_seed(seed, "tiny-base"))
    model = BertModel(config, add_pooling_layer=False)
    with output_dir(folder, force=True) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(tmp)
    return folder


def _sentences(rng: random.Random, n: int) -> list[tuple[str, int, int]]:
    """``n`` sentences with their topic and sentiment labels."""
    topics, moods = list(TOPICS.values()), list(SENTIMENT.values())
    out = []
    for _ in range(n):
        topic, mood = rng.randrange(len(topics)), rng.randrange(len(moods))
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(topics[topic]) for _ in range(rng.randint(1, 2))]
        words += [rng.choice(moods[mood]) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        out.append((" ".join(words), topic, mood))
    return out


def build_tiny_tasks(settings: Mapping[str, Any]) -> list[Task]:
    sizes = (settings["n_train"], settings["n_calib"], settings["n_test"])
    pool = 2 * sum(sizes)
    seed = settings["seed"]
    topic_pool = _sentences(random.Random(derived_seed(seed, "tiny_topic")), pool)
    mood_pool = _sentences(random.Random(derived_seed(seed, "tiny_sentiment")), pool)
    return [
        build_task(
            "tiny_topic", tuple(TOPICS), [s for s, _, _ in topic_pool],
            [t for _, t, _ in topic_pool], sizes=sizes, seed=seed, max_length=16,
            description="synthetic sentence -> topic of its noun",
        ),
        build_task(
            "tiny_sentiment", tuple(SENTIMENT), [s for s, _, _ in mood_pool],
            [m for _, _, m in mood_pool], sizes=sizes, seed=seed, max_length=16,
            description="synthetic sentence -> sentiment of its adjective",
        ),
    ]  # fmt: skip


def tiny_suite(cache_dir: str | Path | None = None, quick: bool = False, **overrides: Any) -> Suite:
    """The tiny stand-in suite (see the module docstring); ``overrides`` change settings."""
    settings = apply_overrides(TINY_DEFAULTS, {**(TINY_QUICK if quick else {}), **overrides})
    suite: Suite

    def base_dir() -> Path:
        model_key = settings_key({k: settings[k] for k in ("hidden", "layers", "seed")})
        folder = suite.cache_root / "tiny" / f"base-{model_key}"
        return build_tiny_base(
            folder, hidden=settings["hidden"], layers=settings["layers"], seed=settings["seed"]
        )

    suite = Suite(
        "tiny",
        settings,
        build_tasks=build_tiny_tasks,
        base_dir=base_dir,
        cache_root=Path(cache_dir) if cache_dir else None,
    )
    return suite
