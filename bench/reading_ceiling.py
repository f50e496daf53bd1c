"""The reading graft's ceiling: what the frozen LLM answers when the image slot holds its *exact* word embeddings.

usage: python bench/reading_ceiling.py --llm /tmp/mars-real/qwen2.5-0.5b-instruct [--out ceiling.json]
       python bench/reading_ceiling.py --graft GRAFT_DIR [--out ceiling.json]

The graft's tower is trained to emit the LLM's own input embeddings of the written tokens, with a blank between them.
This bench skips the tower: it writes the phrase's token embeddings straight into the slot between <|vision_start|>
and <|vision_end|> (separated by nothing, by zero vectors, or by the space token's embedding) and asks the graft's
reading question, so it measures how well a perfect tower could do with each blank choice (word recall, character
accuracy).

With --graft (a folder written by `python -m mars_viz graft`), the slot is the graft's real image slot: the tower's
output is replaced by the exact embeddings through a forward hook, so the image tokens get the graft's own M-RoPE
positions. Compared: a one-row strip (words where a renderer would put them, space-token blanks elsewhere) with the
graft's rotary split (every frequency on the width axis) and with Qwen2-VL's usual split [1/4, 3/8, 3/8]; the same
words in the middle row of three; and one letter per slot (leading-space letter at each word start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mars_lab.metrics import char_accuracy, word_recall  # noqa: E402

PHRASES = ["green river under the old bridge", "seven quick lamps", "a friendly robot waits by the door tonight",
           "music", "paper boats sail slowly across the quiet lake at dawn"]
QUESTION = "What is written in the image? Answer with the text only."


PHRASES_GRAFT = PHRASES + ["Bring me the yellow basket", "cold winter morning",
                           "the teacher wrote a long letter to her brother"]


def _word_slots(tok, emb, phrase, width, height, rng, row):
    space = emb[tok(" ", add_special_tokens=False).input_ids[0]]
    slot = space[None].repeat(width * height, 1)
    x = rng.randint(2, 30)
    for k, w in enumerate(phrase.split()):
        ids = tok(w if k == 0 else " " + w, add_special_tokens=False).input_ids
        for j, t in enumerate(ids):
            slot[row * width + min(width - 1, x // 28 + j)] = emb[t]
        x += int(len(w) * 10.5 + 6)  # an 18-px font's advance
    return slot


def _letter_slots(tok, emb, phrase, width, height, rng, row):
    space = emb[tok(" ", add_special_tokens=False).input_ids[0]]
    slot = space[None].repeat(width * height, 1)
    pos = 0
    for k, w in enumerate(phrase.split()):
        for j, ch in enumerate(w):
            ids = tok((" " + ch) if (j == 0 and k > 0) else ch, add_special_tokens=False).input_ids
            slot[min(width * height - 1, pos)] = emb[ids[0]]
            pos += 1 + (rng.random() < 0.3)
        pos += 1
    return slot


def graft_ceiling(folder: str) -> dict:
    import random

    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(folder)
    tok = proc.tokenizer
    base = AutoConfig.from_pretrained(folder)
    half = base.text_config.hidden_size // base.text_config.num_attention_heads // 2
    usual = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    variants = [("words, 1 row, width-only rotary", [0, 0, half], _word_slots, 24, 1),
                ("words, 1 row, usual rotary split", usual, _word_slots, 24, 1),
                ("words, middle of 3 rows, width-only rotary", [0, 0, half], _word_slots, 24, 3),
                ("letters, 1 row, width-only rotary", [0, 0, half], _letter_slots, 64, 1)]
    out: dict = {"graft": folder, "question": QUESTION, "n": len(PHRASES_GRAFT)}
    for name, section, fill, width, height in variants:
        cfg = AutoConfig.from_pretrained(folder)
        cfg.text_config.rope_parameters["mrope_section"] = section
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, config=cfg, dtype=torch.float32).eval()
        emb = model.get_input_embeddings().weight.detach()
        holder: dict = {}

        def hook(_mod, _args, output, holder=holder):
            output.pooler_output = holder["slot"]
            return output

        handle = model.model.visual.register_forward_hook(hook)
        rows = []
        try:
            for i, p in enumerate(PHRASES_GRAFT):
                holder["slot"] = fill(tok, emb, p, width, height, random.Random(i), height // 2)
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
                enc = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                           images=[Image.new("RGB", (width * 28, height * 28), "white")], return_tensors="pt")
                with torch.no_grad():
                    ids = model.generate(**enc, max_new_tokens=28, do_sample=False)
                ans = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                rows.append({"phrase": p, "answer": ans, "recall": word_recall(p, ans),
                             "chars": char_accuracy(p, ans)})
        finally:
            handle.remove()
        out[name] = {"mrope_section": section, "word_recall": sum(r["recall"] for r in rows) / len(rows),
                     "char_accuracy": sum(r["chars"] for r in rows) / len(rows), "answers": rows}
        print(name, round(out[name]["word_recall"], 3), round(out[name]["char_accuracy"], 3), file=sys.stderr,
              flush=True)
    return out


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--llm")
    ap.add_argument("--graft", help="a graft folder: measure in its real image slot (M-RoPE positions included)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.graft:
        text = json.dumps(graft_ceiling(args.graft), indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    if not args.llm:
        ap.error("pass --llm or --graft")
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
