"""Files, folders, PDFs and long pastes brought into a chat as the text of a user message.

`read_attachment(path)` turns what the user named into an `Attachment`: a text or source file as
it is, a folder as its text files (its `.gitignore` files and those above it up to the repository
root respected through `pathspec`; `.git`, binary and huge files skipped and listed as skipped;
sorted), a PDF as the text `pypdf` extracts page by page. `render_message` writes the attachments
and the typed text into one string, each file under a path header in a fenced block, which is what
goes through the chat template as the user message's content. Plain Python: front ends use it
before MLX is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

MAX_FILE_BYTES = 512_000  # a folder's files above this are skipped as huge (generated code, data dumps)
MAX_SINGLE_BYTES = 16_000_000  # a file named on its own may be larger, up to this
MAX_FOLDER_FILES = 2_000
SNIFF_BYTES = 8192
LANGUAGES = {".py": "python", ".md": "markdown", ".js": "javascript", ".ts": "typescript", ".rs": "rust"}
LANGUAGES.update({".c": "c", ".h": "c", ".cpp": "cpp", ".go": "go", ".java": "java", ".sh": "bash"})
LANGUAGES.update({".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".html": "html"})


class AttachmentError(ValueError):
    """A path that cannot be attached; the message names it and says why."""


@dataclass
class AttachedFile:
    """One file's text, under the path the model sees (relative to the attached folder's parent)."""

    path: str
    text: str


@dataclass
class Attachment:
    """What one named path (or a paste) became: its files' text and what was skipped, with reasons."""

    name: str  # as the chip shows it: "notes.txt", "models/", "paper.pdf", "pasted text"
    kind: str  # "file" | "folder" | "pdf" | "paste"
    source: str = ""  # the path as given (empty for a paste)
    files: list[AttachedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def text(self) -> str:
        """The files under their path headers, as the model reads them."""
        return "\n\n".join(_block(f) for f in self.files)

    @property
    def chars(self) -> int:
        return sum(len(f.text) for f in self.files)

    def summary(self) -> str:
        """One line: the name, how many files and what was skipped."""
        n = len(self.files)
        parts = [self.name]
        if self.kind == "folder":
            parts.append(f"{n} file{'s' * (n != 1)}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return " · ".join(parts)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "files": [[f.path, f.text] for f in self.files],
            "skipped": [list(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Attachment:
        try:
            files = [AttachedFile(str(p), str(t)) for p, t in d.get("files") or []]
            skipped = [(str(p), str(r)) for p, r in d.get("skipped") or []]
            return cls(str(d["name"]), str(d["kind"]), str(d.get("source") or ""), files, skipped)
        except (KeyError, TypeError, ValueError) as e:
            raise AttachmentError(f"a stored attachment is damaged ({type(e).__name__}: {e})") from None


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in `text`, so the block cannot end early."""
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    return "`" * (longest + 1)


def _block(f: AttachedFile) -> str:
    fence = _fence(f.text)
    lang = LANGUAGES.get(Path(f.path).suffix.lower(), "")
    body = f.text if f.text.endswith("\n") or not f.text else f.text + "\n"
    return f"File: {f.path}\n{fence}{lang}\n{body}{fence}"


def render_message(attachments: list[Attachment], text: str) -> str:
    """The user message's content: the attachments' files, then what the user typed."""
    blocks = [a.text for a in attachments if a.files]
    return "\n\n".join([*blocks, text] if text else blocks)


def paste_attachment(text: str, name: Optional[str] = None) -> Attachment:
    """A long paste kept as an attachment (a chip) rather than lines in the prompt box."""
    lines = text.count("\n") + 1
    label = name or f"pasted text ({lines:,} lines)"
    return Attachment(label, "paste", "", [AttachedFile("pasted text", text)])


# --- reading -----------------------------------------------------------------------------------------
def _decode(raw: bytes) -> Optional[str]:
    """The text of a file's bytes, or None when they look binary (a NUL byte, or not UTF-8)."""
    if b"\0" in raw[:SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _read_pdf(path: Path) -> list[AttachedFile]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:  # pragma: no cover - a dependency of the package
        raise AttachmentError(f"{path}: reading PDFs needs pypdf (pip install pypdf)") from None
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise AttachmentError(f"{path}: the PDF is encrypted; decrypt it first")
        pages = [(p.extract_text() or "").strip() for p in reader.pages]
    except (PdfReadError, OSError, ValueError, KeyError) as e:
        raise AttachmentError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(f"[page {i}]\n{t}" for i, t in enumerate(pages, 1) if t)
    if not text:
        raise AttachmentError(f"{path}: the PDF has no extractable text (a scan needs OCR first)")
    return [AttachedFile(path.name, text)]


def _read_file(path: Path) -> Attachment:
    if path.suffix.lower() == ".pdf":
        return Attachment(path.name, "pdf", str(path), _read_pdf(path))
    size = path.stat().st_size
    if size > MAX_SINGLE_BYTES:
        raise AttachmentError(f"{path}: {size:,} bytes is too large to attach (at most {MAX_SINGLE_BYTES:,})")
    text = _decode(path.read_bytes())
    if text is None:
        raise AttachmentError(f"{path}: a binary file; attach text, source or PDF files")
    return Attachment(path.name, "file", str(path), [AttachedFile(path.name, text)])


class _Ignores:
    """The .gitignore rules that apply under a folder: its own, its subfolders', its parents' up to the repo root."""

    def __init__(self, folder: Path):
        import pathspec

        self._pathspec = pathspec
        self.specs: list[tuple[Path, object]] = []
        parents = []
        for d in [folder, *folder.parents]:
            parents.append(d)
            if (d / ".git").exists():
                break
        else:
            parents = [folder]  # not in a repository: only the folder's own rules
        for d in reversed(parents):
            self.add(d)

    def add(self, d: Path) -> None:
        f = d / ".gitignore"
        if f.is_file():
            try:
                lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                return
            self.specs.append((d, self._pathspec.GitIgnoreSpec.from_lines(lines)))

    def ignored(self, path: Path, is_dir: bool) -> bool:
        verdict = False
        for base, spec in self.specs:  # shallowest first: a deeper file's rules win
            try:
                rel = path.relative_to(base).as_posix()
            except ValueError:
                continue
            result = spec.check_file(rel + "/" if is_dir else rel).include
            if result is not None:
                verdict = result
        return verdict


def _read_folder(folder: Path) -> Attachment:
    ignores = _Ignores(folder)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if here != folder:
            ignores.add(here)
        dirs[:] = sorted(d for d in dirs if d != ".git" and not ignores.ignored(here / d, True))
        found += [here / f for f in files if not ignores.ignored(here / f, False)]
        if len(found) > MAX_FOLDER_FILES:
            raise AttachmentError(f"{folder}: more than {MAX_FOLDER_FILES:,} files; attach a smaller folder")
    att = Attachment(folder.name + "/", "folder", str(folder))
    for p in sorted(found, key=lambda p: p.relative_to(folder).as_posix()):
        shown = (Path(folder.name) / p.relative_to(folder)).as_posix()
        try:
            size = p.stat().st_size
            if p.suffix.lower() == ".pdf":
                att.files += _read_pdf(p)
                att.files[-1].path = shown
                continue
            if size > MAX_FILE_BYTES:
                att.skipped.append((shown, f"huge ({size:,} bytes)"))
                continue
            text = _decode(p.read_bytes())
        except (OSError, AttachmentError) as e:
            att.skipped.append((shown, str(e).rpartition(": ")[2] or type(e).__name__))
            continue
        if text is None:
            att.skipped.append((shown, "binary"))
        elif text.strip():
            att.files.append(AttachedFile(shown, text))
    if not att.files:
        raise AttachmentError(f"{folder}: no text files to attach ({len(att.skipped)} skipped)")
    return att


def read_attachment(path: Union[str, Path]) -> Attachment:
    """Read a file, folder or PDF into an Attachment; AttachmentError names the path and the problem."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            return _read_folder(p.resolve())
        if p.is_file():
            return _read_file(p)
    except PermissionError:
        raise AttachmentError(f"{path}: permission denied") from None
    except OSError as e:
        raise AttachmentError(f"{path}: cannot be read ({e.strerror or e})") from None
    raise AttachmentError(f"{path}: no such file or folder")


__all__ = [
    "AttachedFile",
    "Attachment",
    "AttachmentError",
    "paste_attachment",
    "read_attachment",
    "render_message",
]
