"""The reading graft's ceiling: what the frozen LLM answers when the image slot holds its *exact* word embeddings.

usage: python bench/reading_ceiling.py --llm /tmp/mars-real/qwen2.5-0.5b-instruct [--out ceiling.json]

The graft's tower is trained to emit the LLM's own input embeddings of the written tokens, with a blank between them.
This bench skips the tower: it writes the phrase's token embeddings straight into the slot between <|vision_start|>
and <|vision_end|> (separated by nothing, by zero vectors, or by the space token's embedding) and asks the graft's
reading question, so it measures how well a perfect tower could do with each blank choice (word recall, character
accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mars_viz.graft.metrics import char_accuracy, word_recall  # noqa: E402

PHRASES = ["green river under the old bridge", "seven quick lamps", "a friendly robot waits by the door tonight",
           "music", "paper boats sail slowly across the quiet lake at dawn"]
QUESTION = "What is written in the image? Answer with the text only."


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.llm)
    model = AutoModelForCausalLM.from_pretrained(args.llm, dtype=torch.float32).eval()
    emb = model.get_input_embeddings().weight.detach()
    pre = tok.apply_chat_template([{"role": "user", "content": "XXX"}], add_generation_prompt=True, tokenize=False)
    head, tail = pre.split("XXX")
    a = tok(head + "<|vision_start|>", add_special_tokens=False, return_tensors="pt").input_ids[0]
    b = tok("<|vision_end|>" + QUESTION + tail, add_special_tokens=False, return_tensors="pt").input_ids[0]
    space = emb[tok(" ", add_special_tokens=False).input_ids[0]]
    blanks = {"none": [], "zero_x2": [torch.zeros_like(space)] * 2, "space_x1": [space], "space_x2": [space] * 2}
    out: dict = {"llm": args.llm, "question": QUESTION, "n": len(PHRASES)}
    for name, blank in blanks.items():
        rows = []
        for p in PHRASES:
            parts = []
            for t in tok(p, add_special_tokens=False).input_ids:
                parts += [emb[t]] + blank
            slot = torch.stack(parts)
            x = torch.cat([emb[a], slot, emb[b]])[None]
            with torch.no_grad():
                ids = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                     max_new_tokens=24, do_sample=False)
            ans = tok.decode(ids[0], skip_special_tokens=True)
            rows.append({"phrase": p, "answer": ans, "recall": word_recall(p, ans), "chars": char_accuracy(p, ans)})
        out[name] = {"word_recall": sum(r["recall"] for r in rows) / len(rows),
                     "char_accuracy": sum(r["chars"] for r in rows) / len(rows), "answers": rows}
        print(name, round(out[name]["word_recall"], 3), round(out[name]["char_accuracy"], 3), file=sys.stderr)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
