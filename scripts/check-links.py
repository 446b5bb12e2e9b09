#!/usr/bin/env python3
"""Checks that nothing in the repository links or refers outside it.

  scripts/check-links.py          (from any directory; the repository root is
                                   the parent of this script's folder)

Scans every text file that git lists (tracked files, and untracked files
that .gitignore does not exclude; binary files are skipped):

  (a) in *.md files, every relative link target -- inline links and images
      `[text](target)`, reference definitions `[label]: target`, and the
      `href`/`src` of `<a>` and `<img>` tags -- outside code spans and
      fenced code blocks must name a file or folder of the repository that
      git lists (so it exists in a clean clone). Targets with a URL scheme
      (http:, https:, mailto:, ...) are not checked. A `#fragment` on a
      link to a Markdown file (or a pure `#fragment`, for the file itself)
      must be the GitHub anchor of one of its headings (or an explicit
      `<a name>`/`id`).
  (b) no file refers to `../shared/` or to an absolute path under `/work/`
      (folders that exist only on the development machine); this script is
      exempt, since it names them.

Prints each violation as `path:line: message` and exits 1 if there is any;
otherwise prints a one-line summary and exits 0. Python 3 standard library
only.
"""
import os
import re
import subprocess
import sys
import unicodedata
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")

# (b): references to places outside the repository.
OUTSIDE = [
    (re.compile(r"\.\./shared/"), "refers to ../shared/, outside the repository"),
    (re.compile(r"(?<![\w.~/-])/work/"), "refers to an absolute path under /work/, outside the repository"),
]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?:<([^>\n]*)>|([^\s)]+))(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?:<([^>\n]*)>|(\S+))")
HTML_TAG = re.compile(r"<(?:a|img)\b[^>]*>", re.IGNORECASE)
HTML_ATTR = re.compile(r"\b(href|src)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*\b(?:name|id)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def listed_files():
    """Repository-relative paths of the files git lists, or of every file."""
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout
        names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
        return [n for n in names if os.path.isfile(os.path.join(ROOT, n))]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d != ".git" and not d.startswith("build")]
            for f in files:
                found.append(os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/"))
        return sorted(found)


def read_text(path):
    """The file's text, or None for a binary file."""
    with open(os.path.join(ROOT, path), "rb") as f:
        data = f.read()
    if b"\0" in data[:65536]:
        return None
    return data.decode("utf-8", "replace")


def blank_code_spans(line):
    """The line with every code span's content replaced by spaces (same columns)."""
    return CODE_SPAN.sub(lambda m: m.group(1) + " " * len(m.group(2)) + m.group(1), line)


def markdown_lines(text):
    """(line number, line, line with code spans blanked) of the lines outside
    fenced code blocks and HTML comments."""
    fence = None
    in_comment = False
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and \
                    not line.strip()[len(m.group(1)):].strip():
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        if in_comment:
            end = line.find("-->")
            if end < 0:
                continue
            line = " " * (end + 3) + line[end + 3:]
            in_comment = False
        line = re.sub(r"<!--.*?-->", lambda c: " " * len(c.group(0)), line)
        start = line.find("<!--")
        if start >= 0:
            line = line[:start]
            in_comment = True
        yield number, line, blank_code_spans(line)


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors_of(text):
    """The anchors GitHub gives a Markdown file's headings (with -1, -2, ...
    for repeats) and its explicit <a name/id> anchors."""
    anchors = set()
    seen = {}
    previous = None
    for number, line, blanked in markdown_lines(text):
        for m in HTML_ANCHOR.finditer(blanked):
            anchors.add(m.group(1) if m.group(1) is not None else m.group(2))
        title = None
        m = HEADING.match(line)
        if m:
            title = m.group(2)
        elif previous is not None and previous[0] == number - 1 and previous[1].strip() and \
                SETEXT.match(line) and not HEADING.match(previous[1]) and not previous[1].lstrip().startswith(("|", ">", "-", "*")):
            title = previous[1].strip()
        if title is not None:
            base = slug(title)
            if not base:
                previous = (number, line)
                continue
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else "%s-%d" % (base, count))
        previous = (number, line)
    return anchors


class Checker:
    def __init__(self, files):
        self.files = set(files)
        self.dirs = set()
        for f in files:
            parts = f.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                self.dirs.add("/".join(parts[:i]))
        self.anchor_cache = {}
        self.violations = []
        self.links = 0

    def report(self, path, line, message):
        self.violations.append("%s:%d: %s" % (path, line, message))

    def anchors(self, path):
        if path not in self.anchor_cache:
            text = read_text(path)
            self.anchor_cache[path] = anchors_of(text) if text is not None else set()
        return self.anchor_cache[path]

    def check_target(self, path, number, target):
        target = target.strip()
        if not target or SCHEME.match(target) or target.startswith("//"):
            return
        self.links += 1
        location, _, fragment = target.partition("#")
        location = urllib.parse.unquote(location.partition("?")[0])
        if not location:
            resolved = path  # a pure #fragment: this file
        else:
            base = ROOT if location.startswith("/") else os.path.dirname(os.path.join(ROOT, path))
            full = os.path.normpath(os.path.join(base, location.lstrip("/")))
            if full != ROOT and not full.startswith(ROOT + os.sep):
                self.report(path, number, "link '%s' leaves the repository" % target)
                return
            resolved = os.path.relpath(full, ROOT).replace(os.sep, "/")
            if resolved == ".":
                return
            if resolved not in self.files and resolved not in self.dirs:
                if os.path.exists(full):
                    self.report(path, number, "link '%s': '%s' is not in the repository (git does not list it)"
                                % (target, resolved))
                else:
                    self.report(path, number, "link '%s': no file or folder '%s'" % (target, resolved))
                return
        if fragment and resolved.endswith(".md") and resolved in self.files:
            if urllib.parse.unquote(fragment).lower() not in {a.lower() for a in self.anchors(resolved)}:
                self.report(path, number, "link '%s': '%s' has no heading with the anchor '#%s'"
                            % (target, resolved, fragment))

    def check_markdown(self, path, text):
        for number, _, line in markdown_lines(text):
            for m in INLINE_LINK.finditer(line):
                self.check_target(path, number, m.group(1) if m.group(1) is not None else m.group(2))
            m = REF_DEF.match(line)
            if m:
                self.check_target(path, number, m.group(1) if m.group(1) is not None else m.group(2))
            for tag in HTML_TAG.finditer(line):
                for attr in HTML_ATTR.finditer(tag.group(0)):
                    self.check_target(path, number, attr.group(2) if attr.group(2) is not None else attr.group(3))

    def check_outside(self, path, text):
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, message in OUTSIDE:
                if pattern.search(line):
                    self.report(path, number, message)


def main():
    if len(sys.argv) > 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    files = listed_files()
    checker = Checker(files)
    scanned = 0
    markdown = 0
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        scanned += 1
        if path.endswith(".md"):
            markdown += 1
            checker.check_markdown(path, text)
        if path != SELF:
            checker.check_outside(path, text)
    for v in checker.violations:
        print(v)
    if checker.violations:
        print("check-links: %d violation(s) in %d text files" % (len(checker.violations), scanned), file=sys.stderr)
        return 1
    print("check-links: OK: %d text files, %d Markdown files, %d relative links, nothing outside the repository"
          % (scanned, markdown, checker.links))
    return 0


if __name__ == "__main__":
    sys.exit(main())
