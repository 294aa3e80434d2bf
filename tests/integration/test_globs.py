"""The Python translation of Hadoop's glob syntax matches file names exactly as Hadoop's own GlobPattern
(what Spark's pathGlobFilter uses), checked against the JVM's class on a classic session."""

from __future__ import annotations

import re

import pytest

from lakelens.errors import ConfigError
from lakelens.ingest.globs import glob_regex, name_filter

GLOBS = ["*.jpg", "*.{jpg,png}", "im00[0-4]?.*", "[!a-h]*", "a.b", "x+y(1)|$.png", "*[0-9].jp*g", "{a,b{c,d}}*",
         "\\*.png", "^x*", "[^a]*", "[a-c-]*", "*", "??", "[]a]*", "*,*"]
NAMES = ["a.jpg", "b.png", "im0001.jpg", "im0051.png", "zeta.gif", "a.b", "axb", "x+y(1)|$.png", "cat9.jpeg",
         "bc1", "bd", "ad", "*.png", "x.png", "^xy", "abc", "-q", "ab", "]b", "a,b", "na\u00efve.png", "line\nbreak"]


@pytest.mark.classic_only
def test_globs_match_names_as_hadoops_glob_pattern_does(spark):
    jvm = spark._jvm
    for glob in GLOBS:
        java = re.compile(str(jvm.org.apache.hadoop.fs.GlobPattern(glob).compiled().pattern()), re.DOTALL)
        ours = glob_regex(glob)
        for name in NAMES:
            assert bool(ours.fullmatch(name)) == bool(java.fullmatch(name)), (glob, name)


def test_bad_globs_name_the_key():
    for glob in ["[abc", "{a,b", "abc\\"]:
        with pytest.raises(ConfigError, match="embed.path_glob"):
            glob_regex(glob)
    assert name_filter("") is None
    keep = name_filter("*.{jpg,png}")
    assert keep("a.jpg") and keep("b.png") and not keep("c.gif") and not keep("a.jpgx")
