"""The prompt set: real texts that ship on a Debian 12 machine, cut to target lengths.

Three kinds (README.md, "The prompts"):

  doc_qa       long-document question answering: a licence under
               /usr/share/common-licenses/, Python's docstrings, Python source.
  instruction  an instruction over a long context (summarize, explain, rewrite).
  structured   a block of structured data (a table, a log, a code listing) between
               an instruction and a question. The block's tokens are labelled as the
               non-text modality (modality 1, "visual") in the cache file: a STAND-IN
               for image tokens, since no multimodal model can be loaded here. The
               tokens are still text tokens to the model; only the label differs.

Each prompt is the model's chat template around one user turn (plain text when
the tokenizer has none). The document is cut at a line boundary: the fewest
whole lines for which the whole prompt has at least `target` tokens (all of it
when it is shorter), so lengths are per tokenizer and each is recorded.
"""

from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass, field

LICENSES = "/usr/share/common-licenses"
PYLIB = "/usr/lib/python3.11"


@dataclass(frozen=True)
class PromptSpec:
    id: str
    kind: str             # doc_qa | instruction | structured
    source: str           # a path, or "docstrings:<path>"
    target: int           # tokens (at least; all of the source if shorter)
    before: str           # text before the document
    after: str            # text after the document (the question)
    skip_lines: int = 0   # leading lines of the source to leave out (headers, comments)


SPECS = [
    PromptSpec("bsd-summary-256", "instruction", f"{LICENSES}/BSD", 256,
               "Read the following license text.\n\n", "\n\nIn two sentences, what does this license allow and "
               "what does it require?"),
    PromptSpec("cc0-rewrite-512", "instruction", f"{LICENSES}/CC0-1.0", 512,
               "Here is part of a legal text.\n\n", "\n\nRewrite the main point of the text above in plain "
               "English for someone who is not a lawyer."),
    PromptSpec("apache-qa-1k", "doc_qa", f"{LICENSES}/Apache-2.0", 1024,
               "Answer the question using the document below.\n\n", "\n\nQuestion: According to the license "
               "above, what is a \"Contribution\", and who is a \"Contributor\"?"),
    PromptSpec("services-table-1k", "structured", "/etc/services", 1024,
               "The following is a table of network services: name, port/protocol, aliases and comments.\n\n",
               "\n\nUsing the table above, which port and protocol does the service \"imap2\" use, and what is "
               "its alias?", skip_lines=20),
    PromptSpec("artistic-summary-1536", "instruction", f"{LICENSES}/Artistic", 1536,
               "Summarize the following license in five bullet points.\n\n", "\n\nNow write the five bullet "
               "points."),
    PromptSpec("mpl-qa-2k", "doc_qa", f"{LICENSES}/MPL-2.0", 2048,
               "Answer the question using the document below.\n\n", "\n\nQuestion: What does this license "
               "say about distributing a Larger Work that combines Covered Software with other code?"),
    PromptSpec("dpkg-log-2k", "structured", "/var/log/dpkg.log", 2048,
               "Below is an excerpt of a package manager log.\n\n", "\n\nFrom the log above, which packages "
               "were upgraded, and from which version to which version?"),
    PromptSpec("subprocess-doc-3k", "doc_qa", f"docstrings:{PYLIB}/subprocess.py", 3072,
               "Here is the documentation of a Python module.\n\n", "\n\nQuestion: Which function should I use "
               "to run a command and capture its output, and which arguments control that?"),
    PromptSpec("zones-table-3k", "structured", "/usr/share/zoneinfo/zone1970.tab", 3072,
               "The following table lists time zones: country codes, coordinates, zone name and comments.\n\n",
               "\n\nUsing the table above, which time zones are listed for Australia (country code AU)?",
               skip_lines=0),
    PromptSpec("gpl3-qa-4k", "doc_qa", f"{LICENSES}/GPL-3", 4096,
               "Answer the question using the document below.\n\n", "\n\nQuestion: Under this license, what "
               "must you do when you convey a modified version of the program in source form?"),
    PromptSpec("textwrap-code-4k", "doc_qa", f"{PYLIB}/textwrap.py", 4096,
               "Here is the source code of a Python module.\n\n", "\n\nExplain what the function dedent does, "
               "step by step."),
    PromptSpec("stdio-listing-4k", "structured", "/usr/include/stdio.h", 4096,
               "The following is a C header file.\n\n", "\n\nWhich functions declared in the header above read "
               "formatted input, and how do they differ?"),
]

# Tuning-only prompts: more data for `medakv tune` and for choosing amber's
# defaults, disjoint from the judging prompts above (bench/FIDELITY.md, "amber"). Not in the
# default set: dump them with `dump.py --prompts` (or `--prompts tuning`).
TUNING_SPECS = [
    PromptSpec("lgpl21-qa-1k", "doc_qa", f"{LICENSES}/LGPL-2.1", 1024,
               "Answer the question using the document below.\n\n", "\n\nQuestion: What does this license "
               "say about a program that uses the Library but contains no part of it?"),
    PromptSpec("gfdl-summary-1k", "instruction", f"{LICENSES}/GFDL-1.3", 1024,
               "Summarize the following document in three bullet points.\n\n", "\n\nNow write the three "
               "bullet points."),
    PromptSpec("gpl2-rewrite-1536", "instruction", f"{LICENSES}/GPL-2", 1536,
               "Here is part of a legal text.\n\n", "\n\nRewrite the conditions for distributing copies in "
               "plain English."),
    PromptSpec("shlex-code-1k", "doc_qa", f"{PYLIB}/shlex.py", 1024,
               "Here is the source code of a Python module.\n\n", "\n\nExplain what the method read_token "
               "does, step by step."),
    PromptSpec("argparse-doc-2k", "doc_qa", f"docstrings:{PYLIB}/argparse.py", 2048,
               "Here is the documentation of a Python module.\n\n", "\n\nQuestion: How do I add "
               "sub-commands to a parser, and which class handles them?"),
    PromptSpec("protocols-table-1k", "structured", "/etc/protocols", 1024,
               "The following is a table of IP protocols: name, number, aliases and comments.\n\n",
               "\n\nUsing the table above, which protocol number does \"ipv6-icmp\" have, and what is its "
               "alias?"),
    PromptSpec("iso3166-table-1k", "structured", "/usr/share/zoneinfo/iso3166.tab", 1024,
               "The following table lists country codes and country names.\n\n",
               "\n\nUsing the table above, which countries have codes starting with the letter N?"),
    PromptSpec("string-listing-2k", "structured", "/usr/include/string.h", 2048,
               "The following is a C header file.\n\n", "\n\nWhich functions declared in the header above "
               "copy memory or strings, and how do they differ?"),
]

# A short prompt for the checked-in test cache (tests/data): a small table block.
TEST_SPEC = PromptSpec("test-table-short", "structured", "/etc/services", 96,
                       "Table of services:\n", "\nWhich port does ssh use?", skip_lines=22)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def docstrings(path: str, labels: bool = True) -> str:
    """The module's, classes' and functions' docstrings of a Python source file, in source order (each after a
    line naming it, unless ``labels`` is False)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {os.path.basename(path)[:-3]}:\n{doc}" if labels else doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and not node.name.startswith("_"):
                what = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{what} {node.name}:\n{d}" if labels else d)
    return "\n\n".join(parts)


def source_lines(spec: PromptSpec) -> tuple[list, str]:
    """(lines of the document, the file it came from)."""
    if spec.source.startswith("docstrings:"):
        path = spec.source.split(":", 1)[1]
        text = docstrings(path)
    else:
        path = spec.source
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    lines = text.splitlines(keepends=True)[spec.skip_lines:]
    return lines, path


def render(tok, user: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=False)
    # No chat template (Gemma 3 270M is a base model): plain text, after the BOS token
    # the model was trained with (add_special_tokens=False below adds none).
    return (tok.bos_token or "") + user + "\n\nAnswer:"


@dataclass
class Prompt:
    spec: PromptSpec
    text: str                  # what is tokenized (chat template applied)
    ids: list                  # token ids
    modality: list             # 0/1 per token
    block_chars: tuple         # (start, end) of the document in `text`
    lines_used: int
    lines_total: int
    source_path: str
    source_sha256: str
    info: dict = field(default_factory=dict)


def encode(tok, text: str):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def build(tok, spec: PromptSpec) -> Prompt:
    lines, path = source_lines(spec)

    def make(n):
        doc = "".join(lines[:n]).rstrip("\n")
        user = spec.before + doc + spec.after
        text = render(tok, user)
        start = text.index(spec.before + doc) + len(spec.before)
        return text, (start, start + len(doc))

    def length(n):
        return len(encode(tok, make(n)[0])[0])

    lo, hi = 1, len(lines)
    if length(hi) < spec.target:
        n = hi
    else:  # fewest lines with length >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if length(mid) >= spec.target:
                hi = mid
            else:
                lo = mid + 1
        n = lo
    text, (b0, b1) = make(n)
    ids, offsets = encode(tok, text)
    modality = [0] * len(ids)
    if spec.kind == "structured":
        for i, (s, e) in enumerate(offsets):
            if e > s and s < b1 and e > b0:  # the token overlaps the block
                modality[i] = 1
    return Prompt(spec, text, list(ids), modality, (b0, b1), n, len(lines), path, sha256_file(path))


def by_id(ids: list | None) -> list:
    if not ids:
        return list(SPECS)
    if ids == ["tuning"]:
        return list(TUNING_SPECS)
    known = {s.id: s for s in SPECS + TUNING_SPECS + [TEST_SPEC]}
    missing = [i for i in ids if i not in known]
    if missing:
        raise SystemExit(f"unknown prompt id(s) {missing}; known: {sorted(known)}")
    return [known[i] for i in ids]
