"""Prose, code and general-SFT chats from what every Python install carries.

Prose: the ``pydoc_data`` documentation topics (the text of ``help('topic')``) and the docstrings of
standard-library modules, one document per module. Code: standard-library source files. Chats:
instruction/response pairs built from the same docstrings and topics. Everything is read from the
running interpreter's standard library, in sorted order and then a seeded shuffle, so a seed gives
the same output on the same Python version.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field

_EXCLUDE_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                 "encodings", "pydoc_data", "ensurepip", "__pycache__", "__phello__"}
GENERAL_SYSTEM_PROMPT = "You are a helpful assistant who knows the Python standard library."


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Relative paths of the standard library's own .py files (no tests, no bundled tools), sorted."""
    root = stdlib_dir()
    out = []
    for d, dirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in _EXCLUDE_DIRS or p.startswith("config-") for p in parts):
            dirs[:] = []
            continue
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".py") and not n.startswith("_sysconfigdata"):
                out.append("/".join(parts + [n]))
    return sorted(out)


def read_source(rel: str) -> str | None:
    try:
        with open(os.path.join(stdlib_dir(), rel), encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def module_name(rel: str) -> str:
    mod = rel[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


@dataclass
class ModuleDocs:
    module: str
    doc: str | None
    members: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, qualified name, docstring)

    def text(self) -> str:
        parts = [f"Module {self.module}"]
        if self.doc:
            parts.append(self.doc)
        for kind, name, doc in self.members:
            parts.append(f"{kind} {name}\n{doc}")
        return "\n\n".join(parts)


def module_docs(rel: str, source: str) -> ModuleDocs | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    mod = module_name(rel)
    out = ModuleDocs(mod, ast.get_docstring(tree))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            d = ast.get_docstring(node)
            if d:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                out.members.append((kind, f"{mod}.{node.name}", d))
    if not out.doc and not out.members:
        return None
    return out


def pydoc_topics() -> list[tuple[str, str]]:
    import pydoc_data.topics

    return sorted((k, v.strip()) for k, v in pydoc_data.topics.topics.items() if v.strip())


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a sentence or line end when possible."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"), cut.rfind("\n"))
    return cut[: end + 1].strip() if end > limit // 3 else cut.strip()


def general_chats(rng: random.Random, modules: list[ModuleDocs], topics: list[tuple[str, str]], n: int,
                  max_answer_chars: int = 700) -> list[list[dict[str, str]]]:
    """``n`` instruction/response conversations (some multi-turn) drawn from docstrings and topics."""
    makers = []
    for m in modules:
        paras = paragraphs(m.doc or "")
        if paras and len(paras[0]) >= 40:
            makers.append(("module", m.module, paras))
        for kind, name, doc in m.members:
            p = paragraphs(doc)
            if p and len(p[0]) >= 30:
                makers.append((kind, name, p))
    for name, text in topics:
        p = paragraphs(text)
        if len(p) >= 2:
            makers.append(("topic", name, p))
    if not makers:
        return []
    chats = []
    while len(chats) < n:
        kind, name, paras = rng.choice(makers)
        if kind == "module":
            q = rng.choice([f"What does the Python module `{name}` do?",
                            f"Describe the standard-library module {name}.",
                            f"What is `{name}` for?"])
        elif kind == "class":
            q = rng.choice([f"What does the class `{name}` do?", f"Explain the Python class {name}."])
        elif kind == "function":
            q = rng.choice([f"What does the function `{name}` do?", f"Explain `{name}()`."])
        else:
            q = rng.choice([f"Summarise the Python documentation topic '{name}'.",
                            f"Explain the Python topic '{name}' briefly."])
        style = rng.random()
        if style < 0.15 and len(paras) >= 2:  # continue a text
            msgs = [{"role": "user", "content": "Continue this text:\n\n" + _clip(paras[0], max_answer_chars)},
                    {"role": "assistant", "content": _clip(paras[1], max_answer_chars)}]
        else:
            msgs = [{"role": "user", "content": q},
                    {"role": "assistant", "content": _clip(paras[0], max_answer_chars)}]
            if style > 0.75 and len(paras) >= 2:  # a second turn
                msgs += [{"role": "user", "content": rng.choice(["Tell me more.", "Go on.", "Any details?"])},
                         {"role": "assistant", "content": _clip(paras[1], max_answer_chars)}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": GENERAL_SYSTEM_PROMPT})
        chats.append(msgs)
    return chats
