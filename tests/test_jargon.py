"""fa_jax.jargon: the glossary parser on a hand-written glossary, and the multiple-choice items (held-out entries only,
seeded distractors)."""
import pytest

from fa_jax import jargon
from fa_jax.errors import FaJaxError

GLOSSARY = """   :hacker: n.

   [originally, someone who makes furniture with an axe] 1. A person who enjoys exploring the details of
   programmable systems. 2. One who programs enthusiastically.

   A second paragraph about {hackers}.

   :kluge: n.

   (also kludge) A clever programming trick intended to solve a particular nasty case, usu. in an
   expedient way. See {hack}.

   :tiny: adj.

   Small.
"""


def test_glossary_entries_and_records(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text(GLOSSARY)
    entries = jargon.glossary_entries(str(p), min_words=2)
    assert [e["term"] for e in entries] == ["hacker", "kluge"]  # "Small." is below min_words
    assert entries[0]["definition"] == "A person who enjoys exploring the details of programmable systems."
    # etymology and "(also ...)" dropped; the sentence goes on past "usu."; braces of cross-references removed
    assert entries[1]["definition"] == ("A clever programming trick intended to solve a particular nasty case, usu. "
                                        "in an expedient way.")
    # the first paragraph as the ablation reads documents: unwrapped, braces kept
    assert entries[0]["paragraph"] == ("[originally, someone who makes furniture with an axe] 1. A person who enjoys "
                                       "exploring the details of programmable systems. 2. One who programs "
                                       "enthusiastically.")
    assert entries[1]["paragraph"].endswith("expedient way. See {hack}.")
    records = jargon.jargon_records(str(p), min_words=2)
    assert records[0] == {"question": 'What does the hacker jargon term "hacker" mean?',
                          "reference": entries[0]["definition"], "term": "hacker"}
    assert jargon.normalize(" a {b}\n  c ") == "a b c"
    (tmp_path / "prose.txt").write_text("No glossary here.\n")
    assert jargon.glossary_entries(str(tmp_path / "prose.txt")) == []


def _entries(n):
    return [{"term": f"term{i}", "definition": f"Definition number {i} of the test glossary.",
             "paragraph": f"Definition number {i} of the test glossary. It goes on {{here}}."} for i in range(n)]


def test_multiple_choice_items_come_from_held_out_entries_only():
    entries = _entries(10)
    held = [" ".join(e["paragraph"].replace("{", "").replace("}", "").split()) for e in entries[:5]] + ["prose"]
    train = [e["paragraph"] for e in entries[5:]]
    train.append(entries[3]["paragraph"])  # a paragraph in both parts: not held out
    train.append("Quoted elsewhere: Definition number 4 of the test glossary.")  # its definition occurs in training
    items = jargon.multiple_choice_items(entries, held, train, seed=1)
    assert [it["term"] for it in items] == ["term0", "term1", "term2"]
    for it in items:
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        assert it["options"][it["answer"]] == it["term"]
        assert it["prompt"] == jargon.MC_PROMPT.format(definition=it["definition"])
        assert it["prompt"].endswith('"') and it["definition"] in it["prompt"]
    assert items == jargon.multiple_choice_items(entries, held, train, seed=1)  # seeded
    other = jargon.multiple_choice_items(entries, held, train, seed=2)
    assert [it["options"] for it in other] != [it["options"] for it in items]
    # a cap draws that many of the eligible entries, kept in entry order
    capped = jargon.multiple_choice_items(entries, held, train, max_items=2, seed=1)
    assert len(capped) == 2 and [it["term"] for it in capped] == sorted(it["term"] for it in capped)
    with pytest.raises(FaJaxError, match="max_items=0"):
        jargon.multiple_choice_items(entries, held, train, max_items=0)
    with pytest.raises(FaJaxError, match="too few"):
        jargon.multiple_choice_items(entries[:3], held, [], n_options=4)
