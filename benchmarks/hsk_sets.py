"""The HSK evaluation sets: the 180 clips with speech (../shared/data/hsk-audio) and a held-out set of sentences
that no prompt, guard, default or adapter was tuned on.

The held-out set is chosen by a fixed rule from the 4,354 sentences of `hsk-sentences-audio` 1.0.0: every sentence
that is not one of the 180 clips (by id or by Chinese text), ranked within its HSK level by the SHA-256 of
"qwenkit-heldout-1:" + its id; the first 50 of each of the six levels. Its ids are recorded in
benchmarks/data/hsk_heldout.json (`python benchmarks/hsk_sets.py` writes it again and must give the same file);
scripts/hsk_tune_data.py leaves them out of the tuning data. The package carries text only, so the held-out set is
measured on its gold Chinese (translation alone), not from speech.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT.parent / "shared" / "data" / "hsk-audio" / "sentences.jsonl"
HELDOUT = Path(__file__).with_name("data") / "hsk_heldout.json"
PER_LEVEL = 50
SALT = "qwenkit-heldout-1:"


def clips(path: Path = CLIPS) -> list[dict]:
    """The 180 clips: id, hsk_level, zh, en, audio."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def choose_heldout(sentences: list[dict], clip_rows: list[dict]) -> list[str]:
    """The rule above: ids, level by level."""
    banned_ids, banned_zh = {c["id"] for c in clip_rows}, {c["zh"] for c in clip_rows}
    chosen = []
    for level in range(1, 7):
        pool = [s for s in sentences if s["hsk_level"] == level and s["id"] not in banned_ids
                and s["chinese"] not in banned_zh and s.get("translation", {}).get("en")]
        pool.sort(key=lambda s: hashlib.sha256((SALT + s["id"]).encode()).hexdigest())
        chosen += [s["id"] for s in pool[:PER_LEVEL]]
    return chosen


def package_sentences() -> list[dict]:
    """All 4,354 sentences of the package (downloaded once, sha256-pinned, by scripts/hsk_tune_data.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from hsk_tune_data import sentences  # the pinned download lives there

    return sentences()


def heldout_ids() -> list[str]:
    return json.loads(HELDOUT.read_text(encoding="utf-8"))["ids"]


def heldout(sentences: list[dict]) -> list[dict]:
    """The held-out sentences as the clips' rows (id, hsk_level, zh, en, sentence_type), in the recorded order."""
    by_id = {s["id"]: s for s in sentences}
    return [{"id": i, "hsk_level": by_id[i]["hsk_level"], "zh": by_id[i]["chinese"],
             "en": by_id[i]["translation"]["en"], "sentence_type": by_id[i].get("sentence_type")}
            for i in heldout_ids()]


def main() -> int:
    ids = choose_heldout(package_sentences(), clips())
    HELDOUT.parent.mkdir(exist_ok=True)
    HELDOUT.write_text(json.dumps({"source": "hsk-sentences-audio 1.0.0", "rule": __doc__.split("\n\n")[1].strip(),
                                   "ids": ids}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(ids)} held-out ids -> {HELDOUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
