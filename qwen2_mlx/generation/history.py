"""A chat's messages as a tree: every message keeps its alternatives, one of them shown (the active branch).

`regenerate` adds a sibling reply, `edit` rewrites a user message and drops what followed it, the
"drop_oldest" context policy removes the oldest turn. Plain Python: no model, no tokens (`Chat` in
chat.py renders the active branch, `chat_file.py` writes the tree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant")


@dataclass
class Node:
    """One message; `children` are the alternatives for the next message, `active` the one shown."""

    role: str
    content: str
    children: list = field(default_factory=list)
    active: int = 0
    finish_reason: Optional[str] = None
    stats: Optional[dict] = None

    def child(self) -> Optional[Node]:
        return self.children[self.active] if self.children else None

    def append(self, node: Node) -> Node:
        """Add `node` as the newest alternative and show it."""
        self.children.append(node)
        self.active = len(self.children) - 1
        return node

    def to_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.finish_reason is not None:
            d["finish_reason"] = self.finish_reason
        if self.stats is not None:
            d["stats"] = self.stats
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
            d["active"] = self.active
        return d


def validate_message(m: Any, where: str) -> tuple[str, str]:
    """(role, content) of a message dict, or a ValueError naming `where` it is."""
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: a message is a dict with a 'role' and a string 'content'")
    if m.get("role") not in ROLES:
        raise ValueError(f"{where}: role must be 'system', 'user' or 'assistant', not {m.get('role')!r}")
    return m["role"], m["content"]


class MessageTree:
    """The messages after the system prompt, with their branches; `path()` is the active branch.

    Indexes count the system message first when there is one (`offset`), as `Chat.messages` does.
    """

    def __init__(self) -> None:
        self.root = Node("root", "")
        self.offset = 0  # 1 when a system message comes before the tree's messages
        self.dropped: list[dict] = []  # messages removed by the "drop_oldest" policy, oldest first

    def path(self) -> list[Node]:
        path, node = [], self.root.child()
        while node is not None:
            path.append(node)
            node = node.child()
        return path

    def leaf(self) -> Node:
        path = self.path()
        return path[-1] if path else self.root

    def path_to(self, node: Node) -> list[Node]:
        path = self.path()
        return path[: path.index(node) + 1]

    def replace(self, nodes: list[Node]) -> None:
        """One branch of `nodes` instead of the whole tree."""
        self.root = Node("root", "")
        for node in nodes:
            self.leaf().append(node)

    def clear(self) -> None:
        self.root, self.dropped = Node("root", ""), []

    def node_at(self, index: int) -> tuple[Node, Node]:
        """(node, parent) of the message at `index` of the active branch (system message included)."""
        path = self.path()
        n = len(path) + self.offset
        if not -n <= index < n:
            raise IndexError(f"message index {index} is out of range ({n} messages)")
        i = (index % n) - self.offset
        if i < 0:
            raise ValueError("that is the system message: set chat.system to change it")
        return path[i], (path[i - 1] if i > 0 else self.root)

    def reply_at(self, index: int) -> tuple[Node, Node]:
        """(node, parent) of the assistant message at `index`; other messages have no branches."""
        node, parent = self.node_at(index)
        if node.role != "assistant":
            raise ValueError(f"message {index} is a {node.role} message; branches are alternative replies")
        return node, parent

    def edit(self, index: int, text: str) -> None:
        node, _ = self.node_at(index)
        if node.role != "user":
            raise ValueError(f"message {index} is an {node.role} message; edit changes user messages")
        node.content = text
        node.children, node.active = [], 0

    def switch_branch(self, index: int, k: int) -> None:
        _, parent = self.reply_at(index)
        if not 0 <= k < len(parent.children):
            raise IndexError(f"branch {k} is out of range ({len(parent.children)} alternatives)")
        parent.active = k

    def last_user(self) -> Node:
        """The user message a new reply answers: it ends the branch or is followed by one reply."""
        path = self.path()
        users = [n for n in path if n.role == "user"]
        if not users:
            raise ValueError("there is no user message to answer: send one first")
        if path.index(users[-1]) < len(path) - 2:
            raise ValueError(
                "regenerate answers the last user message, which must end the chat or be followed by one reply"
            )
        return users[-1]

    def remove(self, parent: Node, node: Node) -> None:
        """Take back a message just added (a turn refused before it started)."""
        parent.children.remove(node)
        parent.active = max(len(parent.children) - 1, 0)

    @staticmethod
    def can_drop(path: list[Node]) -> bool:
        return any(n.role == "user" for n in path[1:])

    def drop_oldest_turn(self, path: list[Node]) -> None:
        """Remove the first user message and the replies up to the next user message."""
        j = next(i for i in range(1, len(path)) if path[i].role == "user")
        self.dropped.extend({"role": n.role, "content": n.content} for n in path[:j])
        self.root.children, self.root.active = [path[j]], 0
