"""Hadoop's glob syntax (GlobPattern, which Spark's `pathGlobFilter` matches file names with) as a Python
regular expression, so a local folder can be filtered the way Spark would filter it without a JVM (Spark
Connect clients have none)."""

from __future__ import annotations

import re

from lakelens.errors import ConfigError


def glob_regex(glob: str, key: str = "embed.path_glob") -> re.Pattern:
    """The expression Hadoop's GlobPattern compiles `glob` to, translated rule for rule: `*` any run, `?` one
    character, `{a,b}` alternatives, `[...]` sets (`[!...]` negated), `\\` escapes; matched against whole names."""
    out, set_open, curly_open, i = [], 0, 0, 0
    while i < len(glob):
        c = glob[i]
        if c == "\\":
            i += 1
            if i >= len(glob):
                raise ConfigError(f"{key}: {glob!r}: missing escaped character at the end")
            out.append(re.escape(glob[i]) if set_open == 0 else "\\" + glob[i])
        elif c in ".$()|+":
            out.append("\\" + c)
        elif c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "{":
            out.append("(?:")
            curly_open += 1
        elif c == ",":
            out.append("|" if curly_open else ",")
        elif c == "}" and curly_open:
            curly_open -= 1
            out.append(")")
        elif c == "[":
            if set_open:
                raise ConfigError(f"{key}: {glob!r}: unclosed character class at {i}")
            set_open += 1
            out.append("[")
        elif c == "^":
            out.append("^" if set_open else "\\^")
        elif c == "!":
            out.append("^" if set_open and glob[i - 1] == "[" else "!")
        elif c == "]":
            set_open = 0
            out.append("]")
        else:
            out.append(re.escape(c) if not set_open else c)
        i += 1
    if set_open:
        raise ConfigError(f"{key}: {glob!r}: unclosed character class")
    if curly_open:
        raise ConfigError(f"{key}: {glob!r}: unclosed group")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as e:
        raise ConfigError(f"{key}: {glob!r} is not a valid glob: {e}") from None


def name_filter(glob: str):
    """A test of a file name by `glob` (pathGlobFilter's meaning), or None for no filter."""
    if not glob:
        return None
    regex = glob_regex(glob)
    return lambda name: regex.fullmatch(name) is not None
