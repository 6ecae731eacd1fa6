"""Regenerate transmiter_deploy/data/vocabulary.txt from WordNet 3.0.

The auxiliary classes that pad the zero-shot head to a fixed logit width are
drawn from this list. Like the reference implementation, it takes the nouns
below ``object.n.01`` in WordNet; to keep it to "common, visual object
nouns" it keeps only lemmas that were tagged at least ``--min-count`` times in
the semantically tagged corpora (WordNet's cntlist), lower-case (no proper
nouns), at most two words, and from the lexicographer files of visible
things (artifacts, animals, plants, food, natural objects, body parts).

Needs Debian's ``wordnet-base`` package (``apt-get install wordnet-base``);
the generated file is committed, so nothing at run time needs WordNet.

    python scripts/build_vocabulary.py --wordnet /usr/share/wordnet \
        --out transmiter_deploy/data/vocabulary.txt
"""

from __future__ import annotations

import argparse
import re
from collections import deque
from pathlib import Path

OBJECT_SYNSET = "00002684"  # object.n.01 in WordNet 3.0 data.noun
# lexicographer file numbers: 05 animal, 06 artifact, 08 body, 13 food,
# 17 object, 20 plant (people are left out: mostly roles, not visual classes)
VISUAL_LEXFILES = {"05", "06", "08", "13", "17", "20"}
LEMMA_OK = re.compile(r"^[a-z][a-z\-]*( [a-z][a-z\-]*)?$")


def parse_data_noun(path: Path) -> dict[str, tuple[str, list[tuple[str, int]], list[str]]]:
    """offset -> (lexfile, [(lemma, lex_id)], hyponym offsets)."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # licence header
        fields = line.split(" ")
        offset, lexfile, n_words = fields[0], fields[1], int(fields[3], 16)
        lemmas = [(fields[4 + 2 * i], int(fields[5 + 2 * i], 16)) for i in range(n_words)]
        pos = 4 + 2 * n_words
        n_ptrs = int(fields[pos])
        hyponyms = []
        for i in range(n_ptrs):
            symbol, target = fields[pos + 1 + 4 * i], fields[pos + 2 + 4 * i]
            if symbol in ("~", "~i"):
                hyponyms.append(target)
        synsets[offset] = (lexfile, lemmas, hyponyms)
    return synsets


def tag_counts(path: Path) -> dict[str, int]:
    counts = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _sense, count = line.split(" ")
        counts[key] = int(count)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-count", type=int, default=1)
    args = parser.parse_args()

    synsets = parse_data_noun(args.wordnet / "data.noun")
    counts = tag_counts(args.wordnet / "cntlist.rev")
    seen, queue, words = {OBJECT_SYNSET}, deque([OBJECT_SYNSET]), set()
    while queue:
        lexfile, lemmas, hyponyms = synsets[queue.popleft()]
        if lexfile in VISUAL_LEXFILES:
            for lemma, lex_id in lemmas:
                key = f"{lemma.lower()}%1:{lexfile}:{lex_id:02d}::"
                name = lemma.replace("_", " ")
                if counts.get(key, 0) >= args.min_count and LEMMA_OK.match(name):
                    words.add(name)
        for child in hyponyms:
            if child not in seen:
                seen.add(child)
                queue.append(child)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(sorted(words)) + "\n", encoding="utf-8")
    print(f"wrote {len(words)} nouns to {args.out}")


if __name__ == "__main__":
    main()
