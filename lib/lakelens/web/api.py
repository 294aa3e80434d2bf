"""JSON API on the page's Flask server: /api/search, /api/search/image, /api/similar/<id>, /api/tags,
/api/image/<id>, /api/duplicates, /api/health, /thumb/<id>. Every search takes k, offset (the next page),
min_score, prefix and collapse_duplicates; q may use the query syntax (tag:dog, -tag:cat, path:2024/,
"phrases") and query arithmetic ("beach + sunset - people"); /api/search and /api/search/image take mode
(vector | keyword | hybrid) and tag (repeatable; tag=-cat excludes), /api/search/image q and weights too."""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import dataclass

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from lakelens.search import MAX_K, QueryError
from lakelens.search.query import MODES
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbCache, ThumbError, parse_id

log = logging.getLogger(__name__)
TOKEN_COOKIE = "lakelens_token"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
CLIP_ROUTES = ("/knn-service", "/indices-list", "/metadata")  # clip-retrieval's back-end API (web/clip.py)
JSON_PATHS = ("/api/", "/thumb/", "/clip/", *CLIP_ROUTES)  # errors under these paths are JSON, never the page


@dataclass
class Limits:
    default_k: int = 20
    max_k: int = 1000  # a page or API client never needs more; keeps one request's work bounded
    max_offset: int = 9000  # k + offset stays within the Searcher's bound (MAX_K)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_query_chars: int = 2000
    max_prefix_chars: int = 4096
    max_tags: int = 32  # tag= parameters of one request
    max_tag_chars: int = 200
    max_facets: int = 500  # /api/tags?limit=
    thumb_side: int = 256
    thumb_cache: int = 2048
    large_side: int = 1024  # the page's large view of one image (/thumb/<id>?size=large)
    large_cache: int = 64
    max_pixels: int = 16_000_000  # query images and thumbnails: decoded only up to this many pixels
    token: str = ""  # when set, every request must carry it (Authorization: Bearer, ?token= once, or the cookie)
    allowed_hosts: tuple = ()  # Host header names served; empty: any
    # clip-retrieval's API (web/clip.py): the index's name there (empty: the index folder's name), the hosts an
    # image_url may be fetched from (none by default: a server must not fetch URLs for whoever asks), the
    # origins of pages that may read its answers (empty: pages served from this machine; "*": any), and
    # whether answers carry the images themselves (base64), and at which size (thumb | large)
    clip_name: str = ""
    clip_fetch_hosts: tuple = ()
    clip_cors_origins: tuple = ()
    clip_base64: bool = False
    clip_image_size: str = "thumb"
    clip_base64_max: int = 100  # results of one answer with the image inside; later ones have its url only
    clip_indices: tuple = ()  # (name, index folder) of further indices served to clip-retrieval clients only


def public_model(manifest: dict) -> dict:
    """The index's model as a client may see it: no absolute checkpoint path, only its file name."""
    m = manifest["model"]
    pretrained = m.get("pretrained", "")
    shown = pretrained.rsplit("/", 1)[-1] if "/" in pretrained else pretrained
    return {"name": m.get("name"), "weights": shown, "digest": m.get("digest") or None}


# --- parameters (shared with the page's callbacks) ---------------------------------------------
def parse_int(value, name: str, low: int, high: int, default: int) -> int:
    """An integer parameter within [low, high]; `default` when absent; QueryError naming it otherwise."""
    if value is None or value == "":
        return default
    try:
        n = int(str(value).strip())
    except ValueError:
        raise QueryError(f"{name} must be an integer between {low} and {high}, got {value!r}") from None
    if not low <= n <= high:
        raise QueryError(f"{name} must be an integer between {low} and {high}, got {n}")
    return n


def parse_k(value, limits: Limits) -> int:
    return parse_int(value, "k", 1, limits.max_k, limits.default_k)


def parse_min_score(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        score = float(str(value).strip())
    except ValueError:
        raise QueryError(f"min_score must be a number between -1 and 1, got {value!r}") from None
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:  # cosine scores of unit vectors
        raise QueryError(f"min_score must be a number between -1 and 1, got {value!r}")
    return score


def parse_prefix(value, limits: Limits) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > limits.max_prefix_chars:
        raise QueryError(f"prefix is longer than {limits.max_prefix_chars} characters")
    return value


def parse_query(value, limits: Limits) -> str:
    if value is None or not str(value).strip():
        raise QueryError("empty query text (give q=...)")
    if len(value) > limits.max_query_chars:
        raise QueryError(f"query text is longer than {limits.max_query_chars} characters")
    return value


def parse_offset(value, limits: Limits) -> int:
    return parse_int(value, "offset", 0, limits.max_offset, 0)


def parse_weights(value) -> list[float] | None:
    """'0.7,0.3' -> [0.7, 0.3]: the text's and the image's weights (the Searcher checks them)."""
    if value is None or value == "":
        return None
    try:
        return [float(x) for x in str(value).split(",")]
    except ValueError:
        raise QueryError(f"weights must be two numbers separated by a comma, e.g. 0.7,0.3; got {value!r}") from None


def parse_flag(value, name: str) -> bool:
    text = "" if value is None else str(value).strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise QueryError(f"{name} must be true or false (1 or 0), got {value!r}")


def parse_mode(value) -> str | None:
    """vector | keyword | hybrid; None (the index's default) when absent."""
    if value is None or value == "":
        return None
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
    return mode


def parse_tags(values, limits: Limits) -> tuple[list[str], list[str]]:
    """tag=dog&tag=-cat -> (["dog"], ["cat"]): the tags results must carry and those they must not."""
    values = list(values or [])
    if len(values) > limits.max_tags:
        raise QueryError(f"at most {limits.max_tags} tag parameters, got {len(values)}")
    tags, not_tags = [], []
    for value in values:
        text = str(value).strip()
        name = text[1:].strip() if text.startswith("-") else text
        if not name:
            raise QueryError(f"tag must name a tag (tag=dog, or tag=-dog to exclude it), got {value!r}")
        if len(name) > limits.max_tag_chars:
            raise QueryError(f"tag is longer than {limits.max_tag_chars} characters")
        (not_tags if text.startswith("-") else tags).append(name)
    return tags, not_tags


def parse_text(args, limits: Limits, tags: list[str], not_tags: list[str]) -> str | None:
    """q, which may be left out when tag filters are given (the images with those tags, best first)."""
    value = args.get("q")
    if (value is None or not str(value).strip()) and (tags or not_tags):
        return None
    return parse_query(value, limits)


def search_options(args, limits: Limits) -> dict:
    opts = {"k": parse_k(args.get("k"), limits), "min_score": parse_min_score(args.get("min_score")),
            "path_prefix": parse_prefix(args.get("prefix"), limits),
            "offset": parse_offset(args.get("offset"), limits)}
    if parse_flag(args.get("collapse_duplicates"), "collapse_duplicates"):
        opts["collapse_duplicates"] = True  # one result per duplicate group (lakelens dedup --index)
    return opts


def thumb_url(id_: int, version: str) -> str:
    # the version in the URL lets browsers cache a thumbnail for as long as its version is live
    return f"/thumb/{id_}?v={version}"


def optional_int(value) -> int | None:
    """A rank that may be absent (None, or NaN where pandas filled a gap): JSON null, never NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return int(value)


def rows(results, version: str) -> list[dict]:
    # ids are 64-bit: as JSON numbers JavaScript would round them, so they travel as decimal strings
    out = [{"rank": int(r.rank), "score": round(float(r.score), 6), "id": str(int(r.id)), "path": str(r.path),
            "thumb": thumb_url(int(r.id), version)} for r in results.itertuples()]
    # every row has tags and caption (empty and null in a version without a keyword index), so clients
    # need not know which versions have them
    tags = results["tags"] if "tags" in results.columns else [[]] * len(out)
    captions = results["caption"] if "caption" in results.columns else [None] * len(out)
    for row, t, c in zip(out, tags, captions):
        row["tags"] = [str(x) for x in t] if isinstance(t, (list, tuple)) else []
        row["caption"] = c if isinstance(c, str) else None
    for name in ("vector_rank", "keyword_rank"):  # hybrid mode: each side's rank, null where a side missed it
        if name in results.columns:
            for row, v in zip(out, results[name]):
                row[name] = optional_int(v)
    if "duplicates" in results.columns:  # collapsed: how many other copies each result stands for
        for row, n in zip(out, results["duplicates"]):
            row["duplicates"] = int(n)
    if "box" in results.columns:  # a version with regions: the crop that matched, null for the whole image
        for row, b in zip(out, results["box"]):
            row["box"] = box_list(b)
    return out


def box_list(box) -> list[float] | None:
    """A result's box ([x0, y0, x1, y1] fractions of the image) as plain floats, or None."""
    if box is None or (isinstance(box, float) and not math.isfinite(box)):
        return None
    return [round(float(v), 6) for v in box]


def has_keywords(searcher) -> bool:
    """Whether the live version has tags, captions and a keyword index."""
    return searcher.has_keywords


def image_details(searcher, id_: int) -> dict:
    """One image for the API and the page's large view: path, size, tags with scores, caption."""
    if searcher.path_of(id_) is None:
        raise ThumbError(404, f"id {id_} is not in index {searcher.version}")
    d = searcher.details(id_)
    return {"id": str(id_), "path": d["path"], "index_version": d["version"], "width": d.get("width"),
            "height": d.get("height"), "tags": d["tags"], "caption": d["caption"],
            "thumb": thumb_url(id_, d["version"]), "large": thumb_url(id_, d["version"]) + "&size=large"}


def host_name(host: str) -> str:
    """The name part of a Host header: 'example.org:8050' -> 'example.org', '[::1]:8050' -> '[::1]'."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


# --- routes ------------------------------------------------------------------------------------
def is_preflight(req) -> bool:
    """A browser's CORS preflight for clip-retrieval's routes: it never carries a token, and answers no data."""
    return (req.method == "OPTIONS" and req.path in CLIP_ROUTES
            and "Access-Control-Request-Method" in req.headers)


def register(server: Flask, live: LiveSearcher, limits: Limits, thumbs: ThumbCache,
             large: ThumbCache | None = None) -> None:
    def error(status: int, reason: str):
        return jsonify({"error": status, "reason": reason}), status

    def answer(searcher, results, query: dict):
        return jsonify({"index_version": searcher.version, "model": public_model(searcher.manifest),
                        "query": query, "notes": results.attrs.get("notes", []),
                        "results": rows(results, searcher.version)})

    allowed = {h.lower() for h in limits.allowed_hosts}

    @server.before_request
    def guard():
        # a Host allowlist defeats DNS rebinding (a page elsewhere that resolves its name to this server)
        if allowed and host_name(request.host) not in allowed:
            return error(400, "this server does not answer for that host name")
        if limits.token and not is_preflight(request):
            supplied = (bearer(request.headers.get("Authorization", "")) or request.args.get("token")
                        or request.cookies.get(TOKEN_COOKIE) or "")
            if not hmac.compare_digest(supplied.encode(), limits.token.encode()):
                return error(401, "missing or wrong access token (Authorization: Bearer TOKEN, or ?token=TOKEN)")
            g.set_token_cookie = request.args.get("token") == limits.token
        return None

    @server.after_request
    def remember_token(response):
        # a browser that opened /?token=... keeps it as a cookie for the page's own requests
        if limits.token and g.get("set_token_cookie"):
            response.set_cookie(TOKEN_COOKIE, limits.token, httponly=True, samesite="Strict")
        return response

    @server.get("/api/health")
    def health():
        s = live.get()
        m = s.manifest
        return jsonify({"status": "ok", "index_version": s.version, "model": public_model(m), "count": len(s),
                        "dim": m["dim"], "factory": m["factory"], "shards": len(m["shards"]),
                        "published_at": m.get("published_at"), "reload_error": live.last_error})

    def keyword_options(args, s) -> dict:
        tags, not_tags = parse_tags(args.getlist("tag"), limits)
        return {"mode": parse_mode(args.get("mode")) or s.default_mode, "tags": tags, "not_tags": not_tags}

    @server.get("/api/search")
    def search_text():
        opts = search_options(request.args, limits)
        s = live.get()
        kw = keyword_options(request.args, s)
        q = parse_text(request.args, limits, kw["tags"], kw["not_tags"])
        return answer(s, s.search(text=q, **kw, **opts), {"text": q, **kw, **opts})

    @server.post("/api/search/image")
    def search_image():
        opts = search_options(request.values, limits)
        f = request.files.get("image")
        if f is None:
            raise QueryError("send the image as a multipart/form-data file field named 'image'")
        data = f.stream.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            return error(413, f"image is larger than the {limits.max_upload_bytes} byte limit")
        text = request.values.get("q")
        # a blank text beside an image is no text (the image alone), as an empty query box on the page is
        text = parse_query(text, limits) if text is not None and text.strip() else None
        weights = parse_weights(request.values.get("weights"))
        weights = weights if text else None  # they weigh a text against the image: nothing to weigh without one
        s = live.get()
        kw = keyword_options(request.values, s)
        query = {"image": f.filename or "", **({"text": text, "weights": weights} if text else {}), **kw, **opts}
        return answer(s, s.search(text=text, image=data, weights=weights, **kw, **opts), query)

    @server.get("/api/similar/<id_text>")
    def similar(id_text):
        id_ = parse_id(id_text)
        opts = search_options(request.args, limits)
        s = live.get()
        if s.path_of(id_) is None:
            raise ThumbError(404, f"id {id_} is not in index {s.version}")
        return answer(s, s.search_id(id_, **opts), {"id": str(id_), **opts})

    @server.get("/api/tags")
    def tags():
        """Images per tag (facets), most first: over the whole version, the images the filters allow, or
        (with q) the query's best `depth` results."""
        limit = parse_int(request.args.get("limit"), "limit", 1, limits.max_facets, 50)
        depth = parse_int(request.args.get("depth"), "depth", 1, MAX_K, 1000)
        s = live.get()
        kw = keyword_options(request.args, s)
        q = request.args.get("q")
        q = parse_query(q, limits) if q not in (None, "") else None
        found = s.tag_counts(q, kw["tags"], kw["not_tags"], limit=limit, depth=depth, mode=kw["mode"])
        return jsonify({"index_version": found["version"], "scope": found["scope"], "images": found["images"],
                        "tags": found["tags"], "query": {"text": q, **kw, "limit": limit, "depth": depth}})

    @server.get("/api/image/<id_text>")
    def image(id_text):
        return jsonify(image_details(live.get(), parse_id(id_text)))

    @server.get("/api/duplicates")
    def duplicates():
        offset = parse_int(request.args.get("offset"), "offset", 0, 10**9, 0)
        limit = parse_int(request.args.get("limit"), "limit", 1, 500, 20)
        s = live.get()
        found = s.duplicate_groups(offset, limit)
        for group in found["groups"]:
            for m in group["members"]:
                m["thumb"] = thumb_url(m["id"], s.version)
                m["id"] = str(m["id"])
            group["group"] = str(group["group"])
        return jsonify({"index_version": s.version, **found})

    large = large or ThumbCache(limits.large_cache, limits.large_side, max_pixels=limits.max_pixels, s3=thumbs.s3)

    @server.get("/thumb/<id_text>")
    def thumb(id_text):
        size = request.args.get("size", "")
        if size not in ("", "large"):
            raise QueryError(f"size must be large or left out, got {size!r}")
        data = (large if size else thumbs).get(live.get(), parse_id(id_text))
        return data, 200, {"Content-Type": "image/jpeg", "Cache-Control": "private, max-age=3600",
                           "X-Content-Type-Options": "nosniff"}

    @server.before_request
    def outside_our_routes():
        # Dash answers every unknown path with its page; under our prefixes such a path (an id with
        # slashes or dots, /thumb//etc/passwd, an unknown endpoint) is a bad request instead
        rule = request.url_rule.rule if request.url_rule is not None else ""
        if request.path.startswith("/thumb/") and not rule.startswith("/thumb/"):
            return error(400, "id must be a decimal 64-bit integer")
        if request.path.startswith("/api/") and not rule.startswith("/api/"):
            return error(404, f"no such API endpoint: {request.path}")
        if request.path.startswith("/clip/") and not rule.startswith("/clip/"):
            return error(404, f"no such image: {request.path}")
        return None

    @server.errorhandler(QueryError)
    def query_error(e):
        return error(400, str(e))

    @server.errorhandler(ThumbError)
    def thumb_error(e):
        return error(e.status, e.reason)

    @server.errorhandler(413)
    def too_large(e):
        return error(413, f"request body is larger than the {limits.max_upload_bytes} byte upload limit")

    @server.errorhandler(HTTPException)
    def http_error(e):
        if request.path.startswith(JSON_PATHS):
            return error(e.code or 500, e.description or e.name)
        return e

    @server.errorhandler(Exception)
    def unexpected(e):
        log.exception("request %s failed", request.path)
        if request.path.startswith(JSON_PATHS):
            return error(500, f"internal error: {type(e).__name__}")
        return "internal error", 500
