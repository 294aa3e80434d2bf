"""clip-retrieval's back-end API on `lakelens serve`, as its clip_back answers it: POST /knn-service,
GET /indices-list and POST /metadata, with CORS, so ClipClient and the clip-retrieval front end work
against a lakelens index unchanged (docs/clip-retrieval.md)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request

from lakelens.errors import ConfigError
from lakelens.search import MAX_K, QueryError
from lakelens.web.api import CLIP_ROUTES, Limits, parse_flag, parse_int, parse_query
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbCache, ThumbError, parse_id

DEFAULT_IMAGES = 40  # ClipClient's num_images; clip_back itself requires the key
FOLD_SIMILARITY = 0.94  # clip_back's threshold: results this close to a better one are the same image
FETCH_TIMEOUT_S = 10  # clip_back's timeout for image_url
ID_TEXT = re.compile(r"^-?[0-9]{1,20}$")
NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def index_name(index_dir, limits: Limits) -> str:
    return limits.clip_name or Path(index_dir).resolve().name or "index"


# --- the request ---------------------------------------------------------------------------------
def json_body(max_bytes: int) -> dict:
    """The request's JSON object, whatever its content type (the front end sends text/plain, ClipClient
    none)."""
    data = request.get_data(cache=False)
    if len(data) > max_bytes:
        raise ThumbError(413, f"request body is larger than the {max_bytes} byte limit")
    try:
        body = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError):
        raise QueryError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise QueryError("the request body must be a JSON object")
    return body


def given(value) -> bool:
    # the front end sends every input, the unused ones as null and an unused text as ""
    return value is not None and not (isinstance(value, str) and not value.strip())


def count(body: dict, key: str, default: int) -> int:
    value = body.get(key)
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise QueryError(f"{key} must be an integer between 1 and {MAX_K}, got {value!r}")
    return parse_int(int(value) if isinstance(value, float) else value, key, 1, MAX_K, default)


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    return value if isinstance(value, bool) else parse_flag(value, key)


def decode_image(text, limits: Limits) -> bytes:
    """`image`: the file's bytes in base64, alone or as a data URL."""
    if not isinstance(text, str):
        raise QueryError("image must be the image file in base64 (a string)")
    head, comma, payload = text.partition(",")
    if comma and head.startswith("data:"):
        text = payload
    if len(text) > limits.max_upload_bytes * 4 // 3 + 4:
        raise ThumbError(413, f"image is larger than the {limits.max_upload_bytes} byte limit")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("image is not valid base64") from None
    if len(data) > limits.max_upload_bytes:  # the base64 check above lets a few bytes more through
        raise ThumbError(413, f"image is larger than the {limits.max_upload_bytes} byte limit")
    return data


def embedding(value, dim: int) -> np.ndarray:
    """`embedding_input`: a vector of the index's dimension, used as it is (clip_back does not normalise it)."""
    if not isinstance(value, list) or len(value) != dim or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise QueryError(f"embedding_input must be a list of {dim} numbers (this index's dimension), got "
                         + (f"a list of {len(value)} items" if isinstance(value, list) else type(value).__name__))
    vec = np.asarray(value, np.float32)
    if not np.isfinite(vec).all():
        raise QueryError("embedding_input has values that are not finite numbers")
    return vec


class _SameHostsRedirect(urllib.request.HTTPRedirectHandler):
    def __init__(self, hosts: set):
        self.hosts = hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        host = urllib.parse.urlsplit(newurl).hostname or ""
        if host.lower() not in self.hosts:
            raise QueryError(f"image_url redirects to {host or newurl}, a host this server does not fetch from")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url, limits: Limits) -> bytes:
    """`image_url`, fetched only from the hosts `lakelens serve --clip-fetch-host` names."""
    if not isinstance(url, str):
        raise QueryError("image_url must be a string")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QueryError("image_url must be an http or https URL")
    hosts = {h.lower() for h in limits.clip_fetch_hosts}
    if not hosts:
        raise QueryError("image_url: this server fetches images from no host (lakelens serve --clip-fetch-host HOST "
                         "allows one); send the image itself, in base64, as image")
    if parts.hostname.lower() not in hosts:
        raise QueryError(f"image_url: {parts.hostname} is not a host this server fetches images from "
                         f"(--clip-fetch-host)")
    opener = urllib.request.build_opener(_SameHostsRedirect(hosts))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "lakelens"}), timeout=FETCH_TIMEOUT_S) as r:
            data = r.read(limits.max_upload_bytes + 1)
    except urllib.error.HTTPError as e:
        raise QueryError(f"image_url could not be fetched: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise QueryError(f"image_url could not be fetched: {getattr(e, 'reason', e)}") from None
    if len(data) > limits.max_upload_bytes:
        raise ThumbError(413, f"image_url's image is larger than the {limits.max_upload_bytes} byte limit")
    return data


# --- the answer ----------------------------------------------------------------------------------
def fold_near_identical(vectors: np.ndarray, threshold: float = FOLD_SIMILARITY) -> np.ndarray:
    """Which results to keep when near-identical ones are folded as clip_back folds them: results linked by
    cosine similarity >= threshold (directly or through others) are one image, shown once, at its best
    rank. Rows of NaN (a vector not found) are kept."""
    v = np.nan_to_num(np.asarray(vectors, np.float32))
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1)
    near = (v @ v.T) >= threshold
    np.fill_diagonal(near, False)
    keep, seen = np.ones(len(v), bool), np.zeros(len(v), bool)
    for first in range(len(v)):
        if seen[first]:
            continue
        seen[first], stack = True, [first]
        while stack:
            linked = np.flatnonzero(near[stack.pop()] & ~seen)
            seen[linked], keep[linked] = True, False
            stack.extend(linked.tolist())
    return keep


def caption_text(caption, tags) -> str:
    """The caption, else the tags (", "-joined), else "": the front end measures the caption's length."""
    if isinstance(caption, str) and caption:
        return caption
    if isinstance(tags, (list, tuple)) and len(tags):
        return ", ".join(str(t) for t in tags)
    return ""


@dataclass
class Served:
    """One index served to clip-retrieval clients: the page's own (images under /thumb/), or a further one
    (`lakelens serve --clip-index NAME=DIR`, images under /clip/NAME/thumb/)."""

    name: str
    live: LiveSearcher
    thumbs: ThumbCache
    large: ThumbCache
    images: str  # the path its image URLs start with


class Answers:
    """Result rows in clip_back's shape: the url of lakelens's own image of each result, its stored path,
    caption (else tags) and, where the server is asked to, the image in base64."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.large = limits.clip_image_size == "large"

    def url_of(self, served: Served, version: str):
        """id -> the absolute URL of lakelens's own image of it, in this request's answer."""
        head = f"{request.host_url.rstrip('/')}{served.images}/"
        tail = f"?v={version}" + ("&size=large" if self.large else "")
        if self.limits.token and request.args.get("token"):
            # a client that carries the token in its URL (ClipClient) fetches the images the same way
            tail += "&" + urllib.parse.urlencode({"token": request.args["token"]})
        return lambda id_: f"{head}{id_}{tail}"

    def metadata(self, served: Served, s, url_of, id_: int, path: str, caption, tags, embed: bool) -> dict:
        meta = {"url": url_of(id_), "image_path": path, "caption": caption_text(caption, tags)}
        if embed:
            try:
                meta["image"] = base64.b64encode((served.large if self.large else served.thumbs).get(s, id_)).decode()
            except ThumbError:
                pass  # as clip_back, which leaves it out when the file is gone
        return meta

    def rows(self, served: Served, s, results, num_images: int) -> list[dict]:
        """clip_back's list: every result's id and similarity; its metadata for the first num_images."""
        n = len(results)
        captions = results["caption"] if "caption" in results.columns else [None] * n
        tags = results["tags"] if "tags" in results.columns else [None] * n
        out, url_of = [], self.url_of(served, s.version)
        for i, (id_, score, path, caption, tag) in enumerate(zip(results["id"], results["score"], results["path"],
                                                                 captions, tags)):
            row = {"id": int(id_), "similarity": round(float(score), 6)}
            if i < num_images:
                row.update(self.metadata(served, s, url_of, int(id_), str(path), caption, tag,
                                         self.limits.clip_base64 and i < self.limits.clip_base64_max))
            out.append(row)
        return out


# --- routes --------------------------------------------------------------------------------------
def origin_allowed(origin: str, limits: Limits) -> bool:
    """Whether a page from `origin` may read the answers: the --clip-cors-origin list ("*": any), or by
    default a page served from this machine (a page elsewhere must not read a loopback server's images)."""
    if not origin:
        return False
    allowed = {o.lower().rstrip("/") for o in limits.clip_cors_origins}
    if "*" in allowed or origin.lower() in allowed:
        return True
    if allowed:
        return False
    parts = urllib.parse.urlsplit(origin)
    host = (parts.hostname or "").strip("[]")
    try:
        return parts.scheme in ("http", "https") and (host == "localhost" or ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return False


def served_indices(live: LiveSearcher, limits: Limits, thumbs: ThumbCache, large: ThumbCache) -> dict[str, Served]:
    """The page's index and the further ones `--clip-index NAME=DIR` names, by name (first: the default)."""
    served = {index_name(live.index_dir, limits): Served(index_name(live.index_dir, limits), live, thumbs, large, "/thumb")}
    for name, folder in limits.clip_indices:
        if not NAME.match(name) or name in served:
            raise ConfigError(f"--clip-index: {name!r} is not a new index name (letters, digits, . _ -)")
        other = LiveSearcher(folder, query_max_pixels=limits.max_pixels)
        served[name] = Served(name, other, ThumbCache(thumbs.max_entries, thumbs.max_side, max_pixels=thumbs.max_pixels,
                                                      s3=thumbs.s3),
                              ThumbCache(large.max_entries, large.max_side, max_pixels=large.max_pixels, s3=large.s3),
                              f"/clip/{name}/thumb")
    return served


def register(server: Flask, served: dict[str, Served], limits: Limits) -> None:
    answers = Answers(limits)
    default = next(iter(served.values()))
    body_limit = limits.max_upload_bytes * 4 // 3 + 64 * 1024  # a base64 image of the upload limit, and the rest

    def pick(body: dict) -> Served:
        asked = body.get("indice_name")
        if not given(asked):
            return default  # as clip_back: the first index
        if not isinstance(asked, str) or asked not in served:
            raise QueryError(f"unknown indice_name {asked!r}: this server serves "
                             f"{', '.join(repr(n) for n in served)} (GET /indices-list)")
        return served[asked]

    def own_image(url) -> tuple[Served, int] | None:
        """One of this server's own image URLs (the front end's "search by this image" sends a result's url
        back): searched by the image's stored vector, nothing fetched."""
        if not isinstance(url, str):
            return None
        parts = urllib.parse.urlsplit(url)
        if parts.netloc.lower() != request.host.lower():
            return None
        for one in served.values():
            head, _, id_text = parts.path.rpartition("/")
            if head == one.images and ID_TEXT.match(id_text):
                return one, parse_id(id_text)
        return None

    @server.get("/indices-list")
    def indices_list():
        return jsonify(list(served))

    @server.route("/knn-service", methods=["GET", "POST"])
    def knn_service():
        if request.method != "POST":
            return jsonify({"error": 405, "reason": "POST a JSON query to /knn-service"}), 405
        # use_safety_model, use_violence_detector, aesthetic_score, aesthetic_weight and use_mclip need models
        # lakelens does not have; the front end sends them on every query: read by no one, never an error
        body = json_body(body_limit)
        one = pick(body)
        modality = body.get("modality") or "image"
        if modality != "image":
            raise QueryError(f"modality {modality!r}: lakelens indexes images only (modality image)")
        num_images = count(body, "num_images", DEFAULT_IMAGES)
        k = count(body, "num_result_ids", num_images)
        deduplicate = flag(body, "deduplicate")
        inputs = [key for key in ("text", "image", "image_url", "embedding_input") if given(body.get(key))]
        if len(inputs) != 1:
            raise QueryError("give one of text, image (base64), image_url or embedding_input"
                             + (f", not {' and '.join(inputs)}" if inputs else ""))
        kind, value = inputs[0], body[inputs[0]]
        if kind == "text" and not isinstance(value, str):
            raise QueryError("text must be a string")
        # an image of any served index, by its stored vector, searched for in the index asked for
        own = own_image(value) if kind == "image_url" else None
        s = one.live.get()
        groups = deduplicate and s.has_duplicate_groups  # one per group of `lakelens dedup --index`
        opts = {"k": k, "collapse_duplicates": groups}
        if kind == "text":
            results = s.search(text=parse_query(value, limits), **opts)
        elif kind == "embedding_input":
            results = s.search_vector(embedding(value, int(s.manifest["dim"])), **opts)
        elif own is not None:
            vec = own[0].live.get().vector_of(own[1])
            if vec is None:
                raise QueryError(f"image_url names image {own[1]}, which is no longer in index {own[0].name!r}")
            results = s.search_vector(vec, **opts)
        else:
            data = decode_image(value, limits) if kind == "image" else fetch_image(value, limits)
            results = s.search(image=data, **opts)
        if deduplicate and not groups and len(results):
            results = results[fold_near_identical(s.vectors_of(results["id"].to_numpy(np.int64)))]
        return jsonify(answers.rows(one, s, results, num_images))

    @server.route("/metadata", methods=["GET", "POST"])
    def metadata():
        if request.method != "POST":
            return jsonify({"error": 405, "reason": "POST {\"ids\": [...], \"indice_name\": ...} to /metadata"}), 405
        body = json_body(body_limit)
        one = pick(body)
        s = one.live.get()
        ids = body.get("ids")
        if not isinstance(ids, list) or len(ids) > MAX_K:
            raise QueryError(f"ids must be a list of at most {MAX_K} image ids")
        try:
            # the front end sends back the ids it parsed as big numbers as strings
            ids = [parse_id(i if isinstance(i, str) else str(i) if type(i) is int else "") for i in ids]
        except ThumbError:
            raise QueryError("ids must be image ids (64-bit integers, as numbers or decimal strings)") from None
        rows = s.rows_of(ids)
        n = len(rows)
        captions = rows["caption"] if "caption" in rows.columns else [None] * n
        tags = rows["tags"] if "tags" in rows.columns else [None] * n
        out, url_of = [], answers.url_of(one, s.version)
        for i, (id_, path, caption, tag) in enumerate(zip(ids, rows["path"], captions, tags)):
            meta = None if path is None else answers.metadata(
                one, s, url_of, id_, path, caption, tag, limits.clip_base64 and i < limits.clip_base64_max)
            out.append({"id": id_, "metadata": meta})
        return jsonify(out)

    @server.get("/clip/<name>/thumb/<id_text>")
    def other_image(name, id_text):
        one = served.get(name)
        if one is None or one.images == "/thumb":
            raise ThumbError(404, f"no index {name!r} is served here (GET /indices-list)")
        size = request.args.get("size", "")
        if size not in ("", "large"):
            raise QueryError(f"size must be large or left out, got {size!r}")
        data = (one.large if size else one.thumbs).get(one.live.get(), parse_id(id_text))
        return data, 200, {"Content-Type": "image/jpeg", "Cache-Control": "private, max-age=3600",
                           "X-Content-Type-Options": "nosniff"}

    @server.before_request
    def preflight():
        if request.method == "OPTIONS" and request.path in CLIP_ROUTES:
            return "", 204  # the headers come from cors() below
        return None

    @server.after_request
    def cors(response):
        if request.path in CLIP_ROUTES:
            origin = request.headers.get("Origin", "")
            if origin_allowed(origin, limits):
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = (
                    request.headers.get("Access-Control-Request-Headers") or "Content-Type, Authorization")
                response.headers["Access-Control-Max-Age"] = "600"
            response.headers.add("Vary", "Origin")
        return response
