"""Check that cutting README.md into docs/ lost nothing: python .ci/readme_moved_check.py OLD_REV.

Compares README.md at OLD_REV with README.md + docs/*.md in the work tree:
  1. every non-blank line of the old README appears as a line of the new text, compared without heading
     marks and with links reduced to their text (a heading moved a level, a link fixed or added, still
     matches); the lines edited beyond that are listed in EDITED, each checked to be in the new text;
  2. every `backticked` span, --flag, number and file name of the old README appears in the new text
     at least as often as it did before.
Prints what is missing and exits 1 if anything is; 0 otherwise.
"""
import collections
import pathlib
import re
import subprocess
import sys

TOKEN_PATTERNS = {
    "backticked": r"`([^`\n]+)`",
    "flag": r"(?<![\w-])(--[a-z][a-z0-9-]*)",
    "number": r"(?<![\w.])([−-]?\d+(?:[.,]\d+)*(?:e-?\d+)?)",
    "file name": r"([\w./<>-]+\.(?:md|py|json|jsonl|yaml|csv|png|html|db|safetensors|log|sh|lock|toml))\b",
}
# old line -> the line that replaced it (a link to the page the text now points at)
EDITED = {
    "(`--dtype bf16` for models that need the memory; adapters and AdamW stay fp32; see Precision below);":
    "(`--dtype bf16` for models that need the memory; adapters and AdamW stay fp32; see [precision.md](precision.md));",
}


def normalise(line: str) -> str:
    return re.sub(r"\bdocs/([a-z-]+\.md)", r"\1", line.strip())


def bare(line: str) -> str:
    """A line without heading marks, links reduced to their text."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", normalise(line).lstrip("#").strip())


def tokens(text: str) -> collections.Counter:
    found = collections.Counter()
    for kind, pattern in TOKEN_PATTERNS.items():
        for match in re.findall(pattern, text):
            found[(kind, normalise(match))] += 1
    return found


def main(old_rev: str) -> int:
    old = subprocess.run(["git", "show", f"{old_rev}:README.md"], capture_output=True, text=True, check=True).stdout
    pages = [pathlib.Path("README.md"), *sorted(pathlib.Path("docs").glob("*.md"))]
    new = "\n".join(p.read_text() for p in pages)
    new_lines = {bare(line) for line in new.splitlines()}
    old_lines = [line.strip() for line in old.splitlines() if line.strip()]
    missing_lines = [line for line in old_lines
                     if bare(line) not in new_lines and bare(EDITED.get(line, line)) not in new_lines]
    exact = {line.strip() for line in new.splitlines()}
    missing_lines += [f"(EDITED, not in the new text) {new_line}" for new_line in EDITED.values() if new_line not in exact]
    old_tokens, new_tokens = tokens(old), tokens(new)
    short = {tok: (n, new_tokens[tok]) for tok, n in old_tokens.items() if new_tokens[tok] < n}
    print(f"old README: {len(old.splitlines())} lines, {len(old_lines)} non-blank; new: README.md + {len(pages) - 1} docs pages")
    print(f"lines of the old README not found verbatim: {len(missing_lines)}")
    for line in missing_lines:
        print(f"  | {line}")
    print(f"distinct tokens in the old README: {len(old_tokens)} "
          f"({', '.join(f'{sum(1 for k in old_tokens if k[0] == kind)} {kind}' for kind in TOKEN_PATTERNS)}); "
          f"found fewer times than before: {len(short)}")
    for (kind, tok), (n_old, n_new) in sorted(short.items()):
        print(f"  {kind} {tok!r}: {n_old} before, {n_new} now")
    return 1 if missing_lines or short else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD"))
