"""Tag vocabularies (loading, errors naming file, line and column; synonyms and ancestors; digests) and the
numpy core of zero-shot tagging and calibration (selection, per-tag thresholds reaching the target
precision, P/R/F1, the thresholds file's matching rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lakelens
from lakelens.errors import ConfigError
from lakelens.tags import calibrate as cal
from lakelens.tags.vocab import VocabError, builtin_vocabs, load_vocab


def write(tmp_path, text, name="v.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, line, column, words", [
    ("tag,parent\ncat,animal\n", 2, "parent", "unknown parent 'animal'"),
    ("# comment\ntag,synonyms\ncat,kitten\ndog,\nCat,\n", 5, "tag", "duplicate tag 'Cat' (first on line 3)"),
    ("tag,synonyms\ncat,kitty\ndog,kitty\n", 3, "synonyms", "'kitty' already names tag 'cat' (line 2)"),
    ("tag,colour\ncat,black\n", 1, "colour", "unknown column"),
    ("tag,parent\n,x\n", 2, "tag", "empty tag"),
    ("tag,parent\na,b\nb,a\n", 2, "parent", "a cycle of parents"),
    ("tag,parent\na,b,c\n", 2, None, "3 fields, the header has 2 columns"),
])
def test_vocabulary_errors_name_file_line_and_column(tmp_path, text, line, column, words):
    p = write(tmp_path, text)
    with pytest.raises(VocabError) as e:
        load_vocab(p)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert msg.startswith(f"{p}, line {line}") and words in msg
    assert (f"column '{column}'" in msg) if column else "column" not in msg.split(":")[0]


def test_vocabulary_synonyms_ancestors_prompts_and_digest(tmp_path):
    text = ("# source: test\ntag,prompts,synonyms,parent\nanimal,,,\ndog,,puppy|hound,mammal\n"
            "mammal,,,animal\ncat,a photo of a {}|a cat on a sofa,kitten,mammal\n")
    v = load_vocab(write(tmp_path, text))
    assert v.tags == ["animal", "dog", "mammal", "cat"]
    assert v.ancestors("dog") == ["mammal", "animal"] and v.ancestors("animal") == [] and v.ancestors("nope") == []
    assert v.synonyms("dog") == ["puppy", "hound"] and v.resolve(" Puppy ") == "dog" and v.resolve("horse") is None
    assert v.prompts("cat") == ["a photo of a cat", "a cat on a sofa"]
    assert v.prompts("dog", "simple")[0] == "itap of a dog." and len(v.prompts("dog", "openai")) == 80
    # the digest follows the content, not comments or spacing
    same = load_vocab(write(tmp_path, "\n" + text.replace("# source: test", "# other"), "w.csv"))
    other = load_vocab(write(tmp_path, text.replace("kitten", "kitty"), "x.csv"))
    assert same.digest == v.digest != other.digest
    with pytest.raises(ConfigError, match="tag.templates"):
        v.prompts("dog", "fancy")


def test_shipped_vocabularies_load():
    photo = load_vocab("photo")
    assert len(photo) == 80 + 91 + 26  # COCO things, COCO-Stuff stuff, their supercategories ("person" is both)
    assert photo.ancestors("dog") == ["animal"] and photo.resolve("sofa") == "couch"
    assert open(photo.path).readline().startswith("#")
    assert len(load_vocab("fashion-mnist")) == 10
    assert len(load_vocab("shapes")) == 15


def test_a_bare_name_is_a_built_in_vocabulary_and_a_path_a_file(tmp_path, monkeypatch):
    assert builtin_vocabs() == ["fashion-mnist", "photo", "shapes"]
    shapes = load_vocab("shapes")
    assert Path(shapes.path).name == "shapes.csv" and Path(shapes.path).is_file()
    assert Path(shapes.path).parent.parent.parent == Path(lakelens.__file__).parent  # package data
    monkeypatch.chdir(tmp_path)
    copy = write(tmp_path, Path(shapes.path).read_text(), "shapes.csv")
    assert load_vocab(copy).digest == load_vocab("./shapes.csv").digest == shapes.digest  # a path is a file
    (tmp_path / "mine").write_text("tag\na\n")
    assert load_vocab("mine").tags == ["a"]  # a bare name that is no built-in but a file here
    with pytest.raises(VocabError, match=r"nope: no vocabulary file .*\(built in: fashion-mnist, photo, shapes;"):
        load_vocab("nope")
    # thresholds calibrated for a built-in vocabulary go to the user's folder, not into the installed package
    monkeypatch.setenv("LAKELENS_CACHE_DIR", str(tmp_path / "cache"))
    path = cal.write_thresholds(shapes, np.full(len(shapes), 0.3), {}, "m@none", "simple", 0.9, 5, 0.25, 10)
    assert path == tmp_path / "cache" / "vocab" / "shapes.thresholds.json"
    assert "calibrated thresholds from shapes.thresholds.json" in cal.thresholds_for(shapes, "m@none", "simple", 0.25)[1]
    assert cal.thresholds_path(copy) == tmp_path / "shapes.thresholds.json"  # beside a vocabulary file


def test_select_tags_thresholds_cap_and_order():
    scores = np.array([[0.9, 0.2, 0.5, 0.45], [0.1, 0.1, 0.1, 0.1], [0.3, 0.8, 0.7, 0.6]], np.float32)
    thresholds = np.array([0.4, 0.4, 0.75, 0.4], np.float32)  # tag 2 needs 0.75
    rows, cols = cal.select_tags(scores, thresholds, max_tags=2)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 3), (2, 1), (2, 3)]  # best first, capped
    rows, cols = cal.select_tags(scores, thresholds, max_tags=0)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 3), (2, 1), (2, 3)]
    assert cal.predicted(scores, np.zeros(4), 1).sum(1).tolist() == [1, 1, 1]


def test_calibrated_thresholds_reach_the_target_precision():
    rng = np.random.default_rng(0)
    n, tags = 2000, 6
    truth = rng.random((n, tags)) < np.array([0.3, 0.1, 0.05, 0.5, 0.002, 0.2])
    separation = np.array([0.3, 0.15, 0.1, 0.05, 0.3, -0.1])  # tag 5: positives score lower
    scores = (0.2 + truth * separation + rng.normal(0, 0.05, (n, tags))).astype(np.float32)
    names = [f"t{j}" for j in range(tags)]
    for target in (0.8, 0.9, 0.95):
        thresholds, status = cal.choose_thresholds(scores, truth, names, target, min_positives=5, default=0.25)
        report = cal.prf(truth, cal.predicted(scores, thresholds), names)
        assert status["t4"] == cal.TOO_FEW and thresholds[4] == np.float32(0.25)  # 4 positives: the default
        for j, name in enumerate(names):
            m = report["per_tag"][name]
            if status[name] == cal.CALIBRATED:
                assert m["precision"] >= target and m["predicted"] > 0
                # the lowest such threshold: one step lower (the next score below) misses the target
                below = scores[:, j][scores[:, j] < thresholds[j]].max()
                pred = scores[:, j] >= below
                assert (truth[pred, j].mean() < target) or pred.sum() == n
            elif status[name] == cal.UNREACHABLE:
                assert m["predicted"] == 0
        assert status["t0"] == cal.CALIBRATED and report["per_tag"]["t0"]["recall"] > 0.9
        assert status["t5"] == cal.UNREACHABLE
    micro = cal.prf(truth, truth, names)["micro"]
    assert micro == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_lowest_threshold_counts_ties_together():
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.7])
    positive = np.array([True, True, True, False, True])
    assert cal.lowest_threshold(scores, positive, 0.75) == 0.7  # 4/5
    assert cal.lowest_threshold(scores, positive, 0.8) == 0.7  # 4/5 = 0.8
    assert cal.lowest_threshold(scores, positive, 0.85) == 0.9  # the 0.8 tie brings 2/3: all three or none
    assert cal.lowest_threshold(scores, np.zeros(5, bool), 0.5) is None


def test_thresholds_file_used_only_for_its_model_vocabulary_and_templates(tmp_path):
    v = load_vocab(write(tmp_path, "tag\na\nb\nc\n"))
    path = cal.write_thresholds(v, np.array([0.3, 0.9, 0.1]), {"a": cal.CALIBRATED, "b": cal.UNREACHABLE,
                                                               "c": cal.TOO_FEW}, "m@none", "simple", 0.9, 5, 0.2, 100)
    assert path == tmp_path / "v.thresholds.json"
    got, how = cal.thresholds_for(v, "m@none", "simple", 0.25)
    assert got.tolist() == pytest.approx([0.3, 0.9, 0.25]) and "calibrated" in how  # c: the current default
    got, how = cal.thresholds_for(v, "other@none", "simple", 0.25)
    assert got.tolist() == [0.25] * 3 and "another model" in how
    v2 = load_vocab(write(tmp_path, "tag\na\nb\nd\n"))
    assert "another vocab" in cal.thresholds_for(v2, "m@none", "simple", 0.25, path)[1]
    assert "no thresholds file" in cal.thresholds_for(load_vocab(write(tmp_path, "tag\na\n", "u.csv")), "m", "simple", 0.2)[1]


def test_truth_matrix_resolves_synonyms_and_ancestors(tmp_path):
    v = load_vocab(write(tmp_path, "tag,synonyms,parent\nanimal,,\ndog,puppy,animal\ncat,,animal\n"))
    truth, unknown = cal.truth_matrix(v, [["puppy"], ["cat", "unicorn"], []])
    assert truth.tolist() == [[True, True, False], [True, False, True], [False, False, False]]
    assert unknown == ["unicorn"]
    assert cal.split_labels("a| b |") == ["a", "b"] and cal.split_labels(None) == [] and cal.split_labels(["x"]) == ["x"]


def test_tag_config_and_command_errors_name_the_key(tmp_path, capsys):
    from lakelens import config
    from lakelens.cli import main

    for override, key in (("tag.templates=fancy", "tag.templates"), ("tag.threshold=1.5", "tag.threshold"),
                          ("tag.max_tags=-1", "tag.max_tags"), ("tag.target_precision=0", "tag.target_precision"),
                          ("tag.format=csv", "tag.format")):
        with pytest.raises(ConfigError, match=key):
            config.load(None, [override])
    assert main(["tag", "--table", str(tmp_path / "t"), "--tags", str(tmp_path / "tags")]) == 2
    assert "lakelens tag: error: tag.vocab: required" in capsys.readouterr().err
    bad = write(tmp_path, "tag,parent\ncat,pet\n")
    assert main(["tag", "--table", str(tmp_path / "t"), "--tags", str(tmp_path / "x"), "--vocab", str(bad)]) == 2
    assert f"{bad}, line 2, column 'parent': unknown parent 'pet'" in capsys.readouterr().err


def test_eval_tag_metrics_from_an_index_and_a_vocabulary(tmp_path, capsys):
    import json

    from lakelens import Choice, build_local
    from lakelens.cli import main
    from lakelens.models.registry import ModelSpec
    from lakelens.tags.vocab import tag_vectors

    vocab_file = "shapes"  # the built-in vocabulary
    vocab = load_vocab(vocab_file)
    text = tag_vectors(vocab, ModelSpec("lakelens-tiny"))
    # image i is tag i's own text vector; its label is tag i, written as a synonym for "purple" (4)
    paths = [f"file:/lake/im{i}.jpg" for i in range(6)]
    build_local(str(tmp_path / "index"), np.arange(6), text[:6], paths, Choice("Flat", "t", False),
                model_key="lakelens-tiny@none")
    labels = tmp_path / "labels.csv"
    words = [vocab.tags[i] if i != 4 else "violet" for i in range(6)]
    labels.write_text("path,tags\n" + "".join(f"{p},{w}\n" for p, w in zip(paths, words)) + "file:/elsewhere.jpg,red\n")
    out = tmp_path / "m.json"
    assert main(["eval", "--labels", str(labels), "--index", str(tmp_path / "index"), "--vocab", vocab_file,
                 "--set", "tag.max_tags=1", "--set", "tag.threshold=-1", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)["tags"]
    assert report["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0} and report["labelled_tags"] == 6
    assert report["per_tag"]["purple"]["support"] == 1 and json.loads(out.read_text())["tags"]["micro"]["f1"] == 1.0
    assert main(["eval", "--labels", str(labels)]) == 2
    assert "give --tags TAGS" in capsys.readouterr().err


def test_eval_counts_a_predicted_tag_for_its_ancestors_as_the_labels_do(tmp_path, capsys):
    import json

    from lakelens import Choice, build_local
    from lakelens.cli import main
    from lakelens.models.registry import ModelSpec
    from lakelens.tags.vocab import tag_vectors

    vocab_file = write(tmp_path, "tag,prompts,parent\nshape,a shape,\ncircle,a red circle,shape\n"
                                 "square,a blue square,shape\nstripes,a striped background,\n")
    vocab = load_vocab(vocab_file)
    text = tag_vectors(vocab, ModelSpec("lakelens-tiny"))
    # image i is tag i + 1's own text vector (circle, square, stripes): its one predicted tag is that tag
    paths = [f"file:/lake/im{i}.jpg" for i in range(3)]
    build_local(str(tmp_path / "index"), np.arange(3), text[1:], paths, Choice("Flat", "t", False),
                model_key="lakelens-tiny@none")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,tags\n" + "".join(f"{p},{w}\n" for p, w in zip(paths, ["circle", "square", "stripes"])))
    assert main(["eval", "--labels", str(labels), "--index", str(tmp_path / "index"), "--vocab", str(vocab_file),
                 "--set", "tag.max_tags=1", "--set", "tag.threshold=-1"]) == 0
    report = json.loads(capsys.readouterr().out)["tags"]
    # circle and square images are shapes to the labels, and so to the predictions
    assert report["per_tag"]["shape"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "predicted": 2}
    assert report["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
