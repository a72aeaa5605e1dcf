"""The Jargon File's glossary as data: its entries, QA records built from them, and a multiple-choice test.

    entries = glossary_entries("data/text/jargon.txt")     # [{"term", "definition", "paragraph"}]
    records = jargon_records("data/text/jargon.txt")       # [{"question", "reference", "term"}] (QA, generation)
    items = multiple_choice_items(entries, held_out_texts, train_texts, max_items=100, seed=0)

An entry is a line "   :term: ..." followed by its body up to the next entry; "definition" is the first sentence
of the body (without a leading "(also ...)", "[etymology]" or "1.", cross-reference braces removed; a sentence does
not end at "usu.", "e.g." and the like), "paragraph" the body's first paragraph as `fa_jax.ablation` reads documents
(whitespace collapsed, braces kept). Entries whose definition has fewer than `min_words` or more than `max_words`
words are left out.

The multiple-choice test asks which term a definition belongs to: the prompt `MC_PROMPT` with the definition, and
`n_options` terms (the right one and distractors drawn from the other entries), each scored by the model's
log-likelihood of `term + MC_CLOSE` after the prompt (`fa_jax.evaluate.MultipleChoice`). Items come only from
entries whose definition paragraph is a held-out document, is no train document, and whose definition occurs in
no train document (texts compared after `normalize`), so neither adapter has trained on the definitions asked about.
"""
from __future__ import annotations

import re

import numpy as np

from fa_jax.errors import FaJaxError

ENTRY = re.compile(r"^ {3}:([^:\n]{2,40}):\s*(.*)$")
ABBREVIATIONS = ("usu.", "esp.", "e.g.", "i.e.", "vs.", "cf.", "etc.", "orig.", "prob.", "approx.", "st.")
MC_PROMPT = 'Definition: {definition}\nThe jargon term defined above is "'
MC_CLOSE = '"'


def normalize(text: str) -> str:
    """Braces removed, every run of whitespace one space, no surrounding space (how texts are matched here)."""
    return " ".join(text.replace("{", "").replace("}", "").split())


def _first_sentence(body: str) -> str:
    text = re.sub(r"^\(.*?\)\s*", "", body)  # "(also green words)"
    text = re.sub(r"^\[.*?\]\s*", "", text)  # etymology "[from SF fandom]"
    text = re.sub(r"^1\.\s*", "", text)
    text = text.replace("{", "").replace("}", "")
    first = ""
    for piece in re.split(r"(?<=[.!?])\s", text):  # a sentence does not end at an abbreviation ("usu.", "e.g.")
        first = (first + " " + piece).strip()
        if not first.lower().endswith(ABBREVIATIONS):
            break
    return first


def glossary_entries(path: str, min_words: int = 6, max_words: int = 40) -> list[dict]:
    """{"term", "definition", "paragraph"} for each glossary entry of the Jargon File at `path` (module docstring);
    [] for a text without entries."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = ENTRY.match(lines[i])
        i += 1
        if not m:
            continue
        term, body = m.group(1).strip(), []
        while i < len(lines) and not ENTRY.match(lines[i]):
            body.append(lines[i].strip())
            i += 1
        paragraphs = " ".join(line or "\n" for line in body).split("\n")
        paragraph = next((" ".join(p.split()) for p in paragraphs if p.strip()), "")
        first = _first_sentence(" ".join(" ".join(body).split()))
        if min_words <= len(first.split()) <= max_words:
            out.append({"term": term, "definition": first, "paragraph": paragraph})
    return out


def jargon_records(path: str, min_words: int = 6, max_words: int = 40) -> list[dict]:
    """{"question", "reference", "term"} for each glossary entry: the first sentence of its definition."""
    return [{"question": f"What does the hacker jargon term \"{e['term']}\" mean?", "reference": e["definition"],
             "term": e["term"]} for e in glossary_entries(path, min_words, max_words)]


def multiple_choice_items(entries: list[dict], held_out, train, *, max_items: int | None = 100, n_options: int = 4,
                          seed: int = 0) -> list[dict]:
    """Which-term-is-defined items from the entries whose definition is held out (module docstring).

    held_out, train: the documents' texts. At most `max_items` items (None: all), drawn with `seed` and kept in
    entry order; the distractors are `n_options - 1` distinct other terms (case-insensitively different from the
    right one) drawn with `seed`, and the right term's place among the options too. Returns [{"term",
    "definition", "prompt", "options" (terms), "answer" (index of the right one)}].
    """
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise FaJaxError(f"max_items={max_items!r}: expected an integer >= 1 (or None for every eligible entry)")
    if not isinstance(n_options, int) or n_options < 2:
        raise FaJaxError(f"n_options={n_options!r}: expected an integer >= 2")
    held = {normalize(t) for t in held_out}
    train = [normalize(t) for t in train]
    train_set, train_text = set(train), "\n".join(train)
    eligible = [e for e in entries if normalize(e["paragraph"]) in held and normalize(e["paragraph"]) not in train_set
                and normalize(e["definition"]) not in train_text]
    rng = np.random.default_rng(seed)
    if max_items is not None and len(eligible) > max_items:
        eligible = [eligible[i] for i in np.sort(rng.choice(len(eligible), max_items, replace=False))]
    terms = list({e["term"].lower(): e["term"] for e in reversed(entries)}.values())[::-1]  # first spelling of each
    items = []
    for e in eligible:
        others = [t for t in terms if t.lower() != e["term"].lower()]
        if len(others) < n_options - 1:
            raise FaJaxError(f"{len(terms)} distinct terms: too few for {n_options} options per item")
        distractors = [others[i] for i in rng.choice(len(others), n_options - 1, replace=False)]
        answer = int(rng.integers(n_options))
        items.append({"term": e["term"], "definition": e["definition"],
                      "prompt": MC_PROMPT.format(definition=e["definition"]),
                      "options": distractors[:answer] + [e["term"]] + distractors[answer:], "answer": answer})
    return items
