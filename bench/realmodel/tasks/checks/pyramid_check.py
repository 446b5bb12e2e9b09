"""kvpress own pipeline with PyramidKVPress on judge-000 (SmolLM2): 0.5 fails while decoding (see README)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import models, suite, torch
from transformers import pipeline
import kvpress
model, tok = models.load("smollm2", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "out"), threads=1)
inst = suite.instances("judge", 1, 3600, 5200)[0]
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
for cr in (0.5, 0.75, 0.9):
    press = kvpress.PyramidKVPress(compression_ratio=cr)
    try:
        print(cr, repr(pipe(inst["context"], question="\n\n" + inst["question"], press=press, max_new_tokens=16)["answer"]))
    except Exception as e:
        print(cr, "ERROR", type(e).__name__, str(e)[:200])
