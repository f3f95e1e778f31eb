#!/usr/bin/env python3
"""Assemble a deterministic plain-text corpus from documentation already on this machine (no network).

Sources, each a list of documents sorted by a hash of their name (a fixed pseudo-random order):
  man      English man pages of sections 1, 5, 7 and 8, rendered with `man -l` (80 columns, no justification)
  pydoc    Python standard-library docstrings (fixed module list, this interpreter's version)
  doc      /usr/share/doc/*/README*, *.md, *.txt, *.rst (gzip'd too), copyright and changelogs excluded
  pypi     long descriptions from this interpreter's site-packages *.dist-info/METADATA

At most FAMILY_CAP documents of one family (man pages sharing a name prefix such as gcloud_*, one package's
/usr/share/doc) are used. From each source the first documents in that order (1-16 KB each, one per family) fill
its share of the held-out split, the rest fill its share of the training budget, so held-out and training text
come from different documents. The man pages run out at about 12 MB, so the default corpus is ~15.5 MB.

Output (folder given on the command line): train.txt and heldout.txt, documents separated by a line holding
only a form feed (\\f), and manifest.json (every document's source, name, size and split; sha256 of both files).

    python scripts/make_corpus.py OUT_DIR [--train-bytes 16000000] [--heldout-bytes 80000]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Iterator

DOC_SEPARATOR = "\n\f\n"
MAX_DOC_BYTES = 40_000  # longer documents are cut at a paragraph boundary
HELDOUT_DOC_BYTES = (1_000, 16_000)  # held-out documents are mid-sized, so the held-out text spans many of them
# Share of the training budget and of the held-out budget per source.
# The last source (man, the largest) also takes up whatever the others fall short of.
SHARES = {"pydoc": 0.25, "doc": 0.13, "pypi": 0.07, "man": 0.55}
MAN_SECTIONS = ("1", "5", "7", "8")
FAMILY_CAP = 20  # some families have thousands of near-identical pages (gcloud_*, git release notes)

STDLIB_MODULES = sorted("""
abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections concurrent.futures configparser
contextlib copy csv ctypes dataclasses datetime decimal difflib dis email email.message enum fileinput fnmatch
fractions ftplib functools gc getopt gettext glob gzip hashlib heapq hmac html html.parser http http.client
http.cookies http.server imaplib importlib importlib.resources inspect io ipaddress itertools json keyword
linecache locale logging logging.handlers lzma mailbox math mimetypes multiprocessing numbers operator os os.path
pathlib pickle pkgutil platform plistlib poplib pprint queue random re reprlib sched secrets selectors shelve shlex
shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess sys sysconfig
tarfile tempfile textwrap threading time timeit tokenize tomllib trace traceback types typing unicodedata unittest
unittest.mock urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile
zipimport zlib zoneinfo
""".split())

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """NFC, no control characters except tab/newline, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text


def cap(text: str, limit: int = MAX_DOC_BYTES) -> str:
    """Cut text to at most `limit` UTF-8 bytes, at the last paragraph boundary before it."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", errors="ignore")
    cut = head.rfind("\n\n")
    return head[:cut] if cut > limit // 2 else head


def order_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- sources
def man_candidates() -> list[tuple[str, Callable[[], str]]]:
    root = Path("/usr/share/man")
    seen: set[str] = set()
    out = []
    for section in MAN_SECTIONS:
        folder = root / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            real = os.path.realpath(path)
            if real in seen or not path.is_file():
                continue
            seen.add(real)
            out.append((f"man{section}/{path.name}", lambda p=path: render_man(p)))
    return out


def render_man(path: Path) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "MANWIDTH": "80",
           "MANPAGER": "cat", "PAGER": "cat", "HOME": "/tmp"}
    try:
        res = subprocess.run(["man", "--no-justification", "--no-hyphenation", "-P", "cat", "-l", str(path)],
                             capture_output=True, env=env, timeout=30)
    except (subprocess.TimeoutExpired, OSError):
        return ""
    text = res.stdout.decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # any leftover overstrike formatting
    # Drop the page's indentation (7 spaces everywhere) but keep deeper structure readable.
    lines = [line.strip() for line in text.split("\n")]
    return "\n".join(lines)


def pydoc_candidates() -> list[tuple[str, Callable[[], str]]]:
    return [(f"pydoc/{name}", lambda n=name: render_module(n)) for name in STDLIB_MODULES]


def _doc_of(obj) -> str:
    try:
        return inspect.getdoc(obj) or ""
    except Exception:  # noqa: BLE001 - odd objects
        return ""


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def render_module(modname: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - a module missing on this interpreter is skipped
            return ""
        parts = [f"Module {modname}", _doc_of(module)]
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if obj is None or inspect.ismodule(obj):
                continue
            owner = getattr(obj, "__module__", None)
            if owner is not None and owner != modname and not str(owner).startswith(modname + "."):
                continue
            doc = _doc_of(obj)
            if inspect.isclass(obj):
                parts.append(f"class {modname}.{name}{_signature(obj)}\n{doc}".rstrip())
                for mname, member in sorted(vars(obj).items()):
                    if mname.startswith("_") or not callable(member):
                        continue
                    mdoc = _doc_of(member)
                    if mdoc:
                        parts.append(f"{name}.{mname}{_signature(member)}\n{mdoc}")
            elif callable(obj):
                if doc:
                    parts.append(f"{modname}.{name}{_signature(obj)}\n{doc}")
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", "\n\n".join(p for p in parts if p))  # no memory addresses
    return text if len(parts) > 2 or _doc_of(module) else ""


def doc_candidates() -> list[tuple[str, Callable[[], str]]]:
    root = Path("/usr/share/doc")
    out = []
    seen: set[str] = set()
    pattern = re.compile(r"^(readme.*|.*\.(md|txt|rst))(\.gz)?$", re.IGNORECASE)
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        if not path.is_file() or not pattern.match(name) or "copyright" in name or "changelog" in name:
            continue
        if name.startswith(("news", "changes", "history")):
            continue
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        out.append((f"doc/{path.relative_to(root)}", lambda p=path: read_text_file(p)))
    return out


def read_text_file(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\x00" in data:
        return ""
    return data.decode("utf-8", errors="replace")


def pypi_candidates() -> list[tuple[str, Callable[[], str]]]:
    import site
    import sysconfig
    dirs = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    out = []
    for folder in dirs:
        for meta in sorted(Path(folder).glob("*.dist-info/METADATA")):
            out.append((f"pypi/{meta.parent.name}", lambda p=meta: metadata_body(p)))
    return out


def metadata_body(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    head, sep, body = text.partition("\n\n")
    return body if sep else ""


SOURCES: dict[str, Callable[[], list[tuple[str, Callable[[], str]]]]] = {
    "man": man_candidates, "pydoc": pydoc_candidates, "doc": doc_candidates, "pypi": pypi_candidates}


# ---------------------------------------------------------------------------------------------- assembly
def family_of(name: str) -> str:
    """man1/gcloud_x.1.gz -> man:gcloud, doc/git/RelNotes/1.6.txt -> doc:git, pydoc/email.message -> pydoc:email"""
    source, rest = name.split("/", 1)
    if source == "doc":
        return "doc:" + rest.split("/", 1)[0]
    return source.rstrip("0123456789") + ":" + re.split(r"[_.-]", rest, maxsplit=1)[0].lower()


def iter_documents(source: str) -> Iterator[tuple[str, str, str]]:
    """(name, family, text) in hash order, at most FAMILY_CAP documents of one family."""
    candidates = sorted(SOURCES[source](), key=lambda c: order_key(c[0]))
    families: dict[str, int] = {}
    for name, load in candidates:
        family = family_of(name)
        if families.get(family, 0) >= FAMILY_CAP:
            continue
        text = clean(cap(clean(load())))
        if len(text.encode("utf-8")) >= 300:
            families[family] = families.get(family, 0) + 1
            yield name, family, text


def assemble(train_bytes: int, heldout_bytes: int, log=print) -> tuple[list[str], list[str], list[dict]]:
    train, heldout, manifest = [], [], []
    total_train = total_held = 0
    for i, (source, share) in enumerate(SHARES.items()):
        want_train, want_held = int(train_bytes * share), int(heldout_bytes * share)
        if i == len(SHARES) - 1:
            want_train, want_held = train_bytes - total_train, heldout_bytes - total_held
        got_train = got_held = 0
        held_families: set[str] = set()  # one held-out document per family, so held-out text is varied
        for name, family, text in iter_documents(source):
            size = len(text.encode("utf-8"))
            lo, hi = HELDOUT_DOC_BYTES
            if (got_held < 0.85 * want_held and lo <= size <= hi and got_held + size <= 1.15 * want_held
                    and family not in held_families):
                held_families.add(family)
                heldout.append(text)
                got_held += size
                manifest.append({"source": source, "name": name, "bytes": size, "split": "heldout"})
            elif got_train < want_train:
                if got_train + size > want_train:  # the last one is cut to fit the budget exactly-ish
                    text = cap(text, want_train - got_train)
                    size = len(text.encode("utf-8"))
                    if size < 300:
                        break
                train.append(text)
                got_train += size
                manifest.append({"source": source, "name": name, "bytes": size, "split": "train"})
            if got_held >= 0.85 * want_held and got_train >= want_train - 300:
                break
        total_train, total_held = total_train + got_train, total_held + got_held
        log(f"{source}: train {got_train} bytes, held-out {got_held} bytes")
    return train, heldout, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-bytes", type=int, default=16_000_000)
    parser.add_argument("--heldout-bytes", type=int, default=80_000)
    args = parser.parse_args(argv)
    train, heldout, manifest = assemble(args.train_bytes, args.heldout_bytes,
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": DOC_SEPARATOR.join(train) + "\n", "heldout.txt": DOC_SEPARATOR.join(heldout) + "\n"}
    digests = {}
    for fname, text in files.items():
        data = text.encode("utf-8")
        (args.out_dir / fname).write_bytes(data)
        digests[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    info = {"command": "python scripts/make_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "python": sys.version.split()[0], "files": digests, "documents": manifest}
    (args.out_dir / "manifest.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"files": digests, "train_docs": len(train), "heldout_docs": len(heldout)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
