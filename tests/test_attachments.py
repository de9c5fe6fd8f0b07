"""Attachments: files, folders (.gitignore, binary and huge files), PDFs and pastes as message text;
`Chat.attach` sends them through the chat template as the user message's content."""

from __future__ import annotations

import subprocess

import pytest
from api_support import tiny_model

from qwen2_mlx import Chat
from qwen2_mlx.generation import attachments as A
from qwen2_mlx.generation.attachments import AttachmentError, paste_attachment, read_attachment, render_message


def make_pdf(path, pages):
    """A minimal PDF with one line of Helvetica text per page (offsets computed, as pypdf reads them)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


@pytest.fixture
def repo(tmp_path):
    """A small repository: ignored files at the root and in a subfolder, one re-included, a binary, a huge file."""
    root = tmp_path / "proj"
    (root / "src" / "gen").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    (root / "src" / ".gitignore").write_text("gen/\n!keep.log\n")
    (root / "src" / "b.py").write_text("print('b')\n")
    (root / "src" / "a.py").write_text("x = '```'\n")
    (root / "src" / "keep.log").write_text("kept by a negation\n")
    (root / "src" / "noise.log").write_text("ignored\n")
    (root / "src" / "gen" / "out.py").write_text("generated\n")
    (root / "build").mkdir()
    (root / "build" / "x.txt").write_text("ignored\n")
    (root / "src" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0binary")
    (root / "src" / "big.txt").write_text("y" * (A.MAX_FILE_BYTES + 1))
    (root / "README.md").write_text("# Proj\n")
    return root


def test_a_folder_is_its_text_files_sorted_with_gitignore_respected(repo):
    att = read_attachment(repo / "src")
    assert att.kind == "folder" and att.name == "src/"
    # the parent repository's .gitignore applies (*.log), the folder's own too (gen/), and its negation wins
    assert [f.path for f in att.files] == ["src/.gitignore", "src/a.py", "src/b.py", "src/keep.log"]
    assert dict(att.skipped) == {"src/big.txt": f"huge ({A.MAX_FILE_BYTES + 1:,} bytes)", "src/logo.png": "binary"}
    assert att.summary() == "src/ · 4 files · 2 skipped"
    whole = read_attachment(repo)
    paths = [f.path for f in whole.files]
    assert "proj/README.md" in paths and not any(p.startswith(("proj/build/", "proj/.git/")) for p in paths)


def test_each_file_is_under_its_path_header_in_a_fence_it_cannot_close(repo):
    text = read_attachment(repo / "src").text
    assert "File: src/b.py\n```python\nprint('b')\n```" in text
    # a.py holds ``` itself: its fence is longer, so the block holds the whole file
    assert "File: src/a.py\n````python\nx = '```'\n````" in text
    assert render_message([read_attachment(repo / "src" / "b.py")], "What does it print?") == (
        "File: b.py\n```python\nprint('b')\n```\n\nWhat does it print?"
    )


def test_pdfs_become_their_pages_text(tmp_path):
    att = read_attachment(make_pdf(tmp_path / "paper.pdf", ["The passkey is 4711.", "Second page here."]))
    assert att.kind == "pdf" and len(att.files) == 1
    assert att.files[0].text == "[page 1]\nThe passkey is 4711.\n\n[page 2]\nSecond page here."
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(AttachmentError, match=r"bad\.pdf: not a readable PDF"):
        read_attachment(tmp_path / "bad.pdf")


def test_bad_paths_give_one_clear_message(tmp_path, repo):
    with pytest.raises(AttachmentError, match=r"nowhere\.txt: no such file or folder"):
        read_attachment(tmp_path / "nowhere.txt")
    with pytest.raises(AttachmentError, match=r"logo\.png: a binary file"):
        read_attachment(repo / "src" / "logo.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttachmentError, match=r"empty: no text files to attach"):
        read_attachment(tmp_path / "empty")


def test_a_paste_and_the_stored_form_round_trip(repo):
    paste = paste_attachment("line\n" * 300)
    assert paste.name == "pasted text (301 lines)" and paste.kind == "paste"
    att = read_attachment(repo / "src")
    assert A.Attachment.from_dict(att.to_dict()) == att
    with pytest.raises(AttachmentError, match="damaged"):
        A.Attachment.from_dict({"kind": "file"})


def test_chat_attach_sends_the_files_as_the_user_message_content(tmp_path_factory, repo):
    model, tok, _ = tiny_model(tmp_path_factory)
    chat = Chat(model, tok)
    att = chat.attach(repo / "src" / "b.py")
    assert chat.attachments == [att]
    reply = chat.send("What does it print?", max_tokens=5, temperature=0.0)
    assert chat.messages[0] == {"role": "user", "content": render_message([att], "What does it print?")}
    assert chat.attachments == []  # sent with that message, not the next
    plain = Chat(model, tok).send(render_message([att], "What does it print?"), max_tokens=5, temperature=0.0)
    assert reply == plain and reply.stats.prompt_tokens == plain.stats.prompt_tokens
    with pytest.raises(AttachmentError, match="no such file"):
        chat.attach(tmp_path_factory.mktemp("x") / "missing.md")
    assert chat.attachments == []
