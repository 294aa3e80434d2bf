"""The page's search in its URL: parsed and written back unchanged, tags added, replaced and removed."""

from __future__ import annotations

from lakelens.web.urlstate import PageQuery, from_url, to_url


def test_round_trip_and_untrusted_values_kept_as_text():
    pq = PageQuery(q='red "traffic light" + car', mode="hybrid", tags=("dog", "-cat", "<b>x</b>"), k="5",
                   min_score="0.2", prefix="file:/data/a&b=c/")
    assert from_url(to_url(pq)) == pq
    assert to_url(PageQuery()) == "" and from_url("") == from_url(None) == PageQuery() and PageQuery().empty
    assert from_url("?q=") == PageQuery(q="") and not from_url("?q=").empty  # a search for nothing: its error shows
    assert from_url("?similar=12&similar=-34&tag=&tag=%20").similar == "-34"  # the last value; blank tags dropped
    assert from_url("?tag=a&tag=-b").required == ["a"] and from_url("?tag=a&tag=-b").excluded == ["b"]


def test_tags_added_replaced_and_removed():
    pq = PageQuery(q="x", tags=("dog", "-cat"), similar=None)
    assert pq.with_tag("cat").tags == ("dog", "cat")  # asking for a tag replaces excluding it
    assert pq.with_tag("dog", exclude=True).tags == ("-cat", "-dog")
    assert pq.with_tag("dog").tags == ("-cat", "dog")  # no duplicate
    assert pq.without_tag("-cat").tags == ("dog",) and pq.without_tag("cat").tags == ("dog", "-cat")
    browse = PageQuery(similar="42", mode="vector").with_tag("red")  # from images similar to one: a tag browse
    assert (browse.similar, browse.tags, browse.mode) == (None, ("red",), "vector")
    assert to_url(PageQuery(q="a b", tags=("x y",))) == "?q=a+b&tag=x+y"
