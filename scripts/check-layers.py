#!/usr/bin/env python3
"""Checks the module structure of every crate in the workspace.

1. No circle: within each crate, the modules directly under its source root
   (`src/store/` and `src/store.rs` are one module, `store`) never import
   each other in a circle, through `crate::…` or `super::…` paths (also
   inside inline modules, and through names the crate root re-exports); nor
   do the children of any one module, two levels down.
2. Layers: in the common crate (`shared/src`), the modules are grouped in
   layers, `contract` < `state` < `runtime`; a module there is
   `<layer>::<name>` and imports only modules of its own layer or of a layer
   below; no module lives outside a layer.

Comments are not read (a doc link is no import). Exit status 1 and one line
per violation when either rule is broken.

    python3 scripts/check-layers.py              # the workspace
    python3 scripts/check-layers.py --self-test  # shows it catches both
"""

import os
import re
import sys
import tempfile

# The common crate's layers, bottom first.
LAYERS = ["contract", "state", "runtime"]
LAYERED_ROOT = os.path.join("shared", "src")

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments(text):
    """The code of `text` with comments and the contents of string and char
    literals blanked (newlines kept), so neither hides nor fakes a path.
    Handles nested block comments, raw strings and lifetimes."""
    out, i, n = [], 0, len(text)

    def blank(chunk):
        return "".join(c if c == "\n" else " " for c in chunk)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif re.match(r'b?r(#*)"', text[i:]) and (i == 0 or not re.match(r"[A-Za-z0-9_]", text[i - 1])):
            m = re.match(r'b?r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append('""' + blank(text[i + 2 : j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append('""' + blank(text[i + 2 : j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\u\{[0-9A-Fa-f]+\}|\\.|[^\\'\n])'", text[i:])
            if m:
                out.append("''" + blank(text[i + 2 : i + m.end()]))
                i += m.end()
            else:
                out.append(c)  # a lifetime
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def inline_modules(code):
    """(start, end, name) of every inline `mod name { … }` in `code`."""
    found = []
    for m in re.finditer(r"\bmod\s+(%s)\s*\{" % IDENT, code):
        depth, j = 0, m.end() - 1
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        found.append((m.end(), j, m.group(1)))
    return found


def braces_items(text, start):
    """The top-level items of the `{…}` group opening at text[start]."""
    depth, item, items = 0, "", []
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                items.append(item)
                return [x.strip() for x in items if x.strip()]
        if depth == 1 and ch == ",":
            items.append(item)
            item = ""
        else:
            item += ch
    return []


def module_path(root, path):
    """The module path of a source file: src/a/b.rs -> [a, b]; mod.rs,
    lib.rs and main.rs name their folder."""
    rel = os.path.relpath(path, root)
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main") and (parts[-1] == "mod" or len(parts) == 1):
        parts = parts[:-1]
    return parts


def references(text, here, reexports=None):
    """Absolute module paths (lists of names) that `text` (already through
    strip_comments), in the file module `here`, refers to through crate::
    and super:: paths; inside an inline `mod x { … }` a path is resolved
    from that module. A name the crate root re-exports (`pub use a::b::C`
    in lib.rs) resolves to where it comes from."""
    found = []
    scopes = inline_modules(text)
    reexports = reexports or {}

    def module_at(pos):
        return list(here) + [name for (start, end, name) in scopes if start <= pos < end]

    def resolve(path):
        if path and path[0] in reexports:
            return reexports[path[0]] + path[1:]
        return path

    def expand(prefix, at):
        """Reads `a::b::…` at text[at], then a `{…}` group item by item."""
        segments = list(prefix)
        while True:
            m = re.match(IDENT, text[at:])
            if not m:
                break
            segments.append(m.group(0))
            at += m.end()
            if text.startswith("::", at):
                at += 2
            else:
                break
        if text.startswith("{", at):
            for item in braces_items(text, at):
                expand_item(segments, item)
        elif len(segments) > len(prefix):
            found.append(resolve(segments) if not prefix else segments)

    def expand_item(prefix, item):
        m = re.match(r"(%s(?:::%s)*)(?:::(\{.*\}))?" % (IDENT, IDENT), item, flags=re.S)
        if not m:
            return
        path = prefix + m.group(1).split("::")
        if m.group(2):
            for inner in braces_items(m.group(2), 0):
                expand_item(path, inner)
        else:
            found.append(resolve(path) if not prefix else path)

    for m in re.finditer(r"(?<![A-Za-z0-9_$])crate::", text):
        expand([], m.end())
    for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:super::)+)", text):
        ups = m.group(1).count("super::")
        where = module_at(m.start())
        base = where[: max(0, len(where) - ups)]
        expand(list(base), m.end())
    return found


def root_reexports(root):
    """Names the crate root re-exports: `pub use a::b::C;` in lib.rs maps C
    to [a, b]."""
    lib = os.path.join(root, "lib.rs")
    if not os.path.exists(lib):
        return {}
    with open(lib, encoding="utf-8") as f:
        code = strip_comments(f.read())
    found = {}
    for m in re.finditer(r"\bpub\s+use\s+(?:crate::)?((?:%s::)+)(%s)\s*;" % (IDENT, IDENT), code):
        found[m.group(2)] = m.group(1).rstrip(":").split("::")
    return found


def node_of(path_parts, layered, depth=1):
    """The module a path belongs to at `depth` (1: the crate's top-level
    modules; 2: their children…), in the layered crate counted below
    `<layer>` (a layer's own mod.rs is `<layer>::mod`). None: the crate
    root, or a path shallower than `depth`."""
    if layered:
        if not path_parts or path_parts[0] not in LAYERS:
            return None
        if len(path_parts) == 1:
            return "%s::mod" % path_parts[0] if depth == 1 else None
        if len(path_parts) < 1 + depth:
            return None
        return "::".join(path_parts[: 1 + depth])
    if len(path_parts) < depth:
        return None
    return "::".join(path_parts[:depth])


def parent_of(node):
    return node.rsplit("::", 1)[0] if "::" in node else ""


def crate_roots(workspace):
    """Every source root of the workspace: folders holding lib.rs or main.rs
    (a test target's folder with main.rs counts too)."""
    roots = []
    for top in ("shared", "services", "tests"):
        base = os.path.join(workspace, top)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in ("target", ".git")]
            if "lib.rs" in filenames or (
                "main.rs" in filenames and os.path.basename(dirpath) != "bin"
            ):
                if not any(dirpath.startswith(r + os.sep) for r in roots):
                    roots.append(dirpath)
    return sorted(roots)


# How deep circles are looked for: between a crate's top-level modules, and
# between the children (and grandchildren) of any one module.
MAX_DEPTH = 3


def check_root(root, layered):
    """Violations (strings) of one source root."""
    edges = {depth: {} for depth in range(1, MAX_DEPTH + 1)}
    stray = []
    reexports = root_reexports(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            here = module_path(root, path)
            if here and here[0] == "bin":
                continue  # src/bin/*.rs are crates of their own
            if layered and here and here[0] not in LAYERS:
                stray.append(os.path.relpath(path))
            if not here:
                continue  # the crate root declares the modules
            with open(path, encoding="utf-8") as f:
                text = strip_comments(f.read())
            refs = references(text, here, reexports)
            for depth, level in edges.items():
                source = node_of(here, layered, depth)
                if source is None:
                    continue
                for ref in refs:
                    target = node_of(ref, layered, depth)
                    if target is None or target == source:
                        continue
                    if depth > 1 and parent_of(target) != parent_of(source):
                        continue
                    level.setdefault(source, {}).setdefault(target, os.path.relpath(path))
    problems = ["%s: a module outside the layers (%s)" % (p, ", ".join(LAYERS)) for p in sorted(stray)]
    if layered:
        for source, targets in sorted(edges[1].items()):
            for target, where in sorted(targets.items()):
                if LAYERS.index(target.split("::")[0]) > LAYERS.index(source.split("::")[0]):
                    problems.append(
                        "%s: %s imports %s, a layer above it" % (where, source, target)
                    )
    for depth, level in sorted(edges.items()):
        for cycle in cycles(level):
            problems.append(
                "%s: modules import each other in a circle: %s"
                % (root, " -> ".join(cycle + [cycle[0]]))
            )
    return problems


def cycles(edges):
    """One circle per strongly connected component of more than one module
    (Tarjan), each as a path through it."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(path_through(sorted(component), edges))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def path_through(component, edges):
    """A circle inside a strongly connected component, from its first node."""
    members = set(component)
    start = component[0]
    seen, path = set(), []

    def walk(v):
        path.append(v)
        seen.add(v)
        for w in sorted(edges.get(v, {})):
            if w == start and len(path) > 1:
                return True
            if w in members and w not in seen and walk(w):
                return True
        path.pop()
        return False

    walk(start)
    return path or component


def check_workspace(workspace):
    problems = []
    for root in crate_roots(workspace):
        layered = os.path.normpath(root).endswith(LAYERED_ROOT)
        problems += check_root(root, layered)
    return problems


def self_test():
    """A tree with one upward import and one circle must give exactly those
    two violations; a clean tree none."""
    files = {
        "shared/src/lib.rs": "pub mod contract; pub mod state; pub mod runtime;",
        "shared/src/contract/mod.rs": "pub mod error;",
        "shared/src/contract/error.rs": "// crate::runtime::server is only a comment\n",
        "shared/src/state/mod.rs": "pub mod storage;",
        "shared/src/state/storage.rs": "use crate::contract::error::ApiError;\n",
        "shared/src/runtime/mod.rs": "pub mod server; pub mod auth;",
        "shared/src/runtime/server.rs": "use crate::runtime::auth::Caller;\n",
        "shared/src/runtime/auth/mod.rs": "pub mod tls; use super::super::contract::error;\n",
        "shared/src/runtime/auth/tls.rs": "use super::Caller;\n",
        "services/svc/src/lib.rs": "mod error; mod store; mod domain;",
        "services/svc/src/domain.rs": "",
        "services/svc/src/store/mod.rs": "use crate::{domain::Kind, error};\n",
        "services/svc/src/error.rs": "use crate::domain::Kind;\n",
    }
    bad = {
        "shared/src/state/storage.rs": "use crate::{contract::error::ApiError, runtime::server};\n",
        "services/svc/src/error.rs": "use crate::domain::Kind;\nfn f() { super::store::x(); }\n",
    }

    def run(tree):
        with tempfile.TemporaryDirectory() as tmp:
            for rel, text in tree.items():
                path = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            return check_workspace(tmp)

    clean = run(files)
    assert clean == [], "a clean tree gave violations: %s" % clean
    broken = run({**files, **bad})
    assert len(broken) == 2, "expected 2 violations, got %s" % broken
    # What a naive reader misses: a re-export at the root, an upward `pub use`
    # in a layer's mod.rs, a path hidden between two string literals that look
    # like a comment, a circle one level down, `super::` in an inline module.
    sneaky = {
        "shared/src/lib.rs": "pub mod contract; pub mod state; pub mod runtime;\npub use runtime::server::Srv;\n",
        "shared/src/contract/mod.rs": "pub mod error;\npub(crate) use crate::runtime::server::Srv;\n",
        "shared/src/contract/error.rs": 'const A: &str = "/*"; use crate::Srv; const B: &str = "*/";\n',
        "services/svc/src/store/mod.rs": "mod a; mod b;\n",
        "services/svc/src/store/a.rs": "use super::b::X;\n",
        "services/svc/src/store/b.rs": "use super::a::Y;\n#[cfg(test)]\nmod tests { use super::super::a::Z; }\n",
    }
    caught = run({**files, **sneaky})
    for expected in [
        "contract::mod imports runtime::server, a layer above it",
        "contract::error imports runtime::server, a layer above it",
        "circle: store::a -> store::b -> store::a",
    ]:
        assert any(expected in p for p in caught), (expected, caught)
    stray = run({**files, "shared/src/loose.rs": ""})
    assert len(stray) == 1 and "loose.rs: a module outside the layers" in stray[0], stray
    assert any("state::storage imports runtime::server, a layer above it" in p for p in broken), broken
    assert any("circle: error -> store -> error" in p for p in broken), broken
    print(
        "check-layers self-test: a clean tree passes; upward imports (also through a re-export, a\n"
        "layer's mod.rs, or between look-alike comments in strings), circles (also a level down)\n"
        "and a module outside the layers are caught"
    )


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return 0
    workspace = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems = check_workspace(workspace)
    for p in problems:
        print(p)
    if problems:
        print("check-layers: %d violation(s)" % len(problems))
        return 1
    roots = crate_roots(workspace)
    print("check-layers: %d source roots, no circle, shared/src layered %s" % (len(roots), " < ".join(LAYERS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
