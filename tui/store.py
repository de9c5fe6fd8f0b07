"""Every chat, as it happens, in one SQLite file (WAL mode) under the qwen2-mlx data folder.

Messages form a tree (`parent_id`): a regenerated reply or an edited prompt is a sibling of the
message it replaces, so nothing is ever overwritten. A chat's `leaf_id` names the end of the path
shown on screen. Each write commits at once, so a crash loses at most the tokens since the last
flush of a streaming reply. Prompt history (for Up-arrow recall) lives in the same file.

Files attached to a user message (`qwen2_mlx.generation.attachments`) are rows of `attachments`
holding the text as it was sent, so a reopened chat reads exactly what the model read. The table
came with schema version 1; an older file gains it when opened and its chats stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qwen2_mlx.generation.attachments import Attachment, AttachmentError, render_message
from qwen2_mlx.loading.paths import data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    system TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    model TEXT NOT NULL DEFAULT '',
    leaf_id INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_parent ON messages(chat_id, parent_id);
CREATE TABLE IF NOT EXISTS attachments (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attachments_message ON attachments(message_id, position);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    created REAL NOT NULL
);
"""

SCHEMA_VERSION = 1  # 0: no attachments table (files written before it; CREATE ... IF NOT EXISTS adds it)

# Status of a stored assistant reply. "streaming" left in the file means the app died mid-reply.
FINISHED = {"stop": "done", "length": "length", "context": "context", "cancelled": "stopped"}


@dataclass
class Message:
    id: int
    chat_id: int
    parent_id: Optional[int]
    role: str
    content: str
    status: str = "done"
    stats: dict = field(default_factory=dict)
    created: float = 0.0
    attachments: list[Attachment] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The message as the model reads it: attached files first, then the typed text."""
        return {"role": self.role, "content": render_message(self.attachments, self.content)}


@dataclass
class ChatRecord:
    id: int
    title: str
    system: Optional[str]
    settings: dict
    model: str
    leaf_id: Optional[int]
    created: float
    updated: float


def default_db_path() -> Path:
    return data_dir() / "chats.sqlite3"


class Store:
    """A thin, synchronous layer over sqlite3; every method commits before it returns."""

    def __init__(self, path: Optional[Path] = None):
        self.db_path = Path(path) if path is not None else default_db_path()
        if str(self.db_path) != ":memory:":
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def cache_key(self, chat_id: Optional[int]) -> Optional[str]:
        """The name of a chat's KV cache on disk: its id, tagged with this database (--db may differ)."""
        if chat_id is None:
            return None
        where = str(self.db_path.resolve()) if str(self.db_path) != ":memory:" else f":memory:{id(self)}"
        return f"chat-{hashlib.sha1(where.encode()).hexdigest()[:8]}-{chat_id}"

    # chats
    def new_chat(
        self, title: str = "", system: Optional[str] = None, settings: Optional[dict] = None, model: str = ""
    ) -> ChatRecord:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO chats(title, system, settings, model, created, updated) VALUES (?,?,?,?,?,?)",
            (title, system, json.dumps(settings or {}, ensure_ascii=False), model, now, now),
        )
        return self.chat(cur.lastrowid)

    def chat(self, chat_id: int) -> Optional[ChatRecord]:
        row = self.db.execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()
        if row is None:
            return None
        return ChatRecord(
            row["id"],
            row["title"],
            row["system"],
            json.loads(row["settings"] or "{}"),
            row["model"],
            row["leaf_id"],
            row["created"],
            row["updated"],
        )

    def chats(self) -> list[ChatRecord]:
        rows = self.db.execute("SELECT id FROM chats ORDER BY updated DESC, id DESC").fetchall()
        return [self.chat(r["id"]) for r in rows]

    def update_chat(self, chat_id: int, **fields: Any) -> None:
        allowed = {"title", "system", "settings", "model", "leaf_id"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown chat fields: {sorted(bad)}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"], ensure_ascii=False)
        sets = ", ".join(f"{k}=?" for k in fields) + ", updated=?"
        self.db.execute(f"UPDATE chats SET {sets} WHERE id=?", (*fields.values(), time.time(), chat_id))

    def delete_chat(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
        self.db.execute("DELETE FROM chats WHERE id=?", (chat_id,))

    # messages
    def _message(self, row) -> Message:
        return Message(
            row["id"],
            row["chat_id"],
            row["parent_id"],
            row["role"],
            row["content"],
            row["status"],
            json.loads(row["stats"] or "{}"),
            row["created"],
            self.attachments(row["id"]) if row["role"] == "user" else [],
        )

    def attachments(self, message_id: int) -> list[Attachment]:
        """The files attached to a message, in the order they were sent (a damaged row is left out)."""
        rows = self.db.execute(
            "SELECT data FROM attachments WHERE message_id=? ORDER BY position", (message_id,)
        ).fetchall()
        out = []
        for r in rows:
            try:
                out.append(Attachment.from_dict(json.loads(r["data"])))
            except (ValueError, AttachmentError):
                continue
        return out

    def message(self, message_id: int) -> Optional[Message]:
        row = self.db.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        return self._message(row) if row else None

    def add_message(
        self,
        chat_id: int,
        parent_id: Optional[int],
        role: str,
        content: str,
        status: str = "done",
        attachments: Optional[list[Attachment]] = None,
    ) -> Message:
        """Append a message (with its attachments) under `parent_id` and make it the chat's leaf, in one
        transaction."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT INTO messages(chat_id, parent_id, role, content, status, created) VALUES (?,?,?,?,?,?)",
                (chat_id, parent_id, role, content, status, now),
            )
            for i, a in enumerate(attachments or []):
                self.db.execute(
                    "INSERT INTO attachments(message_id, position, data) VALUES (?,?,?)",
                    (cur.lastrowid, i, json.dumps(a.to_dict(), ensure_ascii=False)),
                )
            self.db.execute("UPDATE chats SET leaf_id=?, updated=? WHERE id=?", (cur.lastrowid, now, chat_id))
        return self.message(cur.lastrowid)

    def update_message(
        self, message_id: int, content: Optional[str] = None, status: Optional[str] = None, stats: Optional[dict] = None
    ) -> None:
        fields: dict[str, Any] = {}
        if content is not None:
            fields["content"] = content
        if status is not None:
            fields["status"] = status
        if stats is not None:
            fields["stats"] = json.dumps(stats)
        if fields:
            sets = ", ".join(f"{k}=?" for k in fields)
            self.db.execute(f"UPDATE messages SET {sets} WHERE id=?", (*fields.values(), message_id))

    def children(self, chat_id: int, parent_id: Optional[int]) -> list[Message]:
        if parent_id is None:
            rows = self.db.execute(
                "SELECT * FROM messages WHERE chat_id=? AND parent_id IS NULL ORDER BY id", (chat_id,)
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT * FROM messages WHERE chat_id=? AND parent_id=? ORDER BY id", (chat_id, parent_id)
            ).fetchall()
        return [self._message(r) for r in rows]

    def siblings(self, message: Message) -> list[Message]:
        return self.children(message.chat_id, message.parent_id)

    def path(self, chat_id: int, leaf_id: Optional[int] = None) -> list[Message]:
        """The messages from the root to `leaf_id` (default: the chat's leaf), oldest first."""
        if leaf_id is None:
            rec = self.chat(chat_id)
            leaf_id = rec.leaf_id if rec else None
        out: list[Message] = []
        while leaf_id is not None:
            m = self.message(leaf_id)
            if m is None:
                break
            out.append(m)
            leaf_id = m.parent_id
        return out[::-1]

    def deepest(self, message: Message) -> Message:
        """Follow the newest child down from `message`: the leaf a branch switch lands on."""
        while True:
            kids = self.children(message.chat_id, message.id)
            if not kids:
                return message
            message = kids[-1]

    def recover_interrupted(self) -> int:
        """Mark replies left "streaming" by a crash as interrupted; returns how many."""
        cur = self.db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")
        return cur.rowcount

    # prompt history
    def add_history(self, text: str) -> None:
        last = self.db.execute("SELECT text FROM history ORDER BY id DESC LIMIT 1").fetchone()
        if text.strip() and (last is None or last["text"] != text):
            self.db.execute("INSERT INTO history(text, created) VALUES (?,?)", (text, time.time()))

    def history(self, limit: int = 1000) -> list[str]:
        rows = self.db.execute("SELECT text FROM history ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [r["text"] for r in rows][::-1]
