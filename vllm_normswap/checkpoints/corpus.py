"""Training text for the zoo: documents split deterministically into train and held-out.

Default: the source files of the running interpreter's standard library (real text that exists on every machine
with Python, and that no one here wrote). ``--corpus PATH``: a user's text files or JSONL (one ``{"text": ...}``
per line), a file or a directory. A document goes to held-out iff a hash of its name falls below the held-out
fraction, so the split depends only on the name: the same file is held out on every machine and Python version,
and adding documents never moves an old one across the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sysconfig
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
HELDOUT_FRACTION = 0.05


@dataclasses.dataclass
class Corpus:
    train: list[str]  # training documents, in a fixed (name-sorted) order
    heldout: list[str]  # held-out documents, never trained on
    source: str  # where it came from, for reports ("stdlib python 3.11.7" or the path)
    fingerprint: str  # sha256 over (name, text) of every document: keys the resumable training cache

    def describe(self) -> dict:
        return {"source": self.source, "train_docs": len(self.train), "heldout_docs": len(self.heldout),
                "train_chars": sum(map(len, self.train)), "heldout_chars": sum(map(len, self.heldout)),
                "fingerprint": self.fingerprint[:16]}


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def _split(docs: list[tuple[str, str]], source: str, fraction: float) -> Corpus:
    docs = sorted(docs)
    digest = hashlib.sha256()
    train, heldout = [], []
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        (heldout if is_heldout(name, fraction) else train).append(text)
    if len(docs) == 1:  # one document: hold out its tail instead (a hash split would put it all on one side)
        text = docs[0][1]
        cut = int(len(text) * (1 - fraction))
        train, heldout = [text[:cut]], [text[cut:]]
    if not train or not heldout:
        raise ValueError(f"corpus {source!r} has {len(docs)} document(s), split into {len(train)} train / "
                         f"{len(heldout)} held-out; give more documents (files or JSONL lines)")
    return Corpus(train, heldout, source, digest.hexdigest())


def stdlib_corpus(fraction: float = HELDOUT_FRACTION) -> Corpus:
    """Every ``*.py`` of the running interpreter's standard library (not site-packages: that differs per machine).
    Files that are not valid UTF-8 (a few encoding tests) are skipped rather than mangled."""
    import platform

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((rel, text))
    return _split(docs, f"stdlib python {platform.python_version()}", fraction)


def user_corpus(path, fraction: float = HELDOUT_FRACTION) -> Corpus:
    """Text files (one document each) and JSONL files (one document per line, field "text") under ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--corpus {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in TEXT_SUFFIXES]
    if not files:
        raise ValueError(f"--corpus {path}: no files ending in {', '.join(TEXT_SUFFIXES)}")
    docs = []
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix != ".jsonl":
            docs.append((rel, text))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{lineno}: not valid JSON ({e}); JSONL needs one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{f}:{lineno}: a JSONL line must be an object with a string field "text"')
            docs.append((f"{rel}:{lineno}", record["text"]))
    return _split(docs, str(path), fraction)


def load_corpus(path=None, fraction: float = HELDOUT_FRACTION) -> Corpus:
    return stdlib_corpus(fraction) if path is None else user_corpus(path, fraction)
