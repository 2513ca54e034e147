#!/usr/bin/env python3
"""Checks that README's prerequisites and what the scripts install agree.

scripts/prerequisites.sh holds the Debian packages each script needs
(PREREQUISITES_DEV_UP, _TEST, _CI). This checks that:
- README's "The two commands" names every one of them, and the Rust version
  it asks for is Cargo.toml's rust-version;
- each script installs packages only through prerequisites.sh
  (`missing_packages`), and only packages of its own list;
- .ci/run installs at least what scripts/test.sh (which it runs) needs.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "scripts/dev-up.sh": "PREREQUISITES_DEV_UP",
    "scripts/test.sh": "PREREQUISITES_TEST",
    ".ci/run": "PREREQUISITES_CI",
}


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def main():
    problems = []
    lists = {
        name: body.split()
        for name, body in re.findall(r"^(PREREQUISITES_\w+)=\(([^)]*)\)", read("scripts/prerequisites.sh"), re.M)
    }
    for var in SCRIPTS.values():
        if var not in lists:
            problems.append("scripts/prerequisites.sh defines no %s" % var)
    readme = read("README.md")
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    for package in sorted({p for ps in lists.values() for p in ps}):
        if "`%s`" % package not in section and not re.search(r"apt-get install [^`]*\b%s\b" % re.escape(package), section):
            problems.append("README's \"The two commands\" does not name the Debian package `%s`" % package)
    rust = re.search(r'^rust-version\s*=\s*"([^"]+)"', read("Cargo.toml"), re.M)
    if not rust or ("Rust ≥ %s" % rust.group(1)) not in section:
        problems.append(
            "README's \"The two commands\" must ask for Rust ≥ %s (Cargo.toml's rust-version)"
            % (rust.group(1) if rust else "?")
        )
    for script, var in SCRIPTS.items():
        text = read(script)
        own = set(lists.get(var, []))
        if not re.search(r"^\. scripts/prerequisites\.sh$", text, re.M):
            problems.append("%s does not source scripts/prerequisites.sh" % script)
        if "apt-get" in text:
            problems.append("%s calls apt-get itself; install through prerequisites.sh" % script)
        for args in re.findall(r"missing_packages ([^)]*)\)", text):
            if args.strip() == '"${%s[@]}"' % var:
                continue
            for package in args.split():
                if package.startswith('"${'):
                    problems.append("%s installs %s, not its own list %s" % (script, package, var))
                elif package not in own:
                    problems.append("%s installs %s, which %s does not list" % (script, package, var))
    if not set(lists.get("PREREQUISITES_TEST", [])) <= set(lists.get("PREREQUISITES_CI", [])):
        problems.append(".ci/run runs scripts/test.sh: PREREQUISITES_CI must hold PREREQUISITES_TEST")
    for p in problems:
        print(p)
    if problems:
        print("check-prerequisites: %d problem(s)" % len(problems))
        return 1
    print("check-prerequisites: README and the scripts agree on %s" % ", ".join(sorted({p for ps in lists.values() for p in ps})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
