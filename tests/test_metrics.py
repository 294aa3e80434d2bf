"""train/metrics.py: ranks of targets (ties counted against them), Recall@K, precision@K, ANN recall, the plot."""

import numpy as np
import pytest

from lakelens.train.metrics import ann_recall, best_ranks, plot_recall, precision_at_k, ranks_of_targets, recall_at_k

SCORES = np.array([[0.9, 0.1, 0.5],
                   [0.2, 0.2, 0.8],
                   [0.3, 0.3, 0.3]])


def test_ranks_count_ties_against_the_target():
    # q0: best; q1: one higher (0.8) and one tie (0.2) ahead -> 3; q2: all tied -> last
    assert list(ranks_of_targets(SCORES, [0, 1, 2])) == [1, 3, 3]


def test_recall_at_k_including_k_beyond_the_set():
    r = recall_at_k(ranks_of_targets(SCORES, [0, 1, 2]), [1, 2, 3, 10])
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: 1.0, 10: 1.0}


def test_missing_targets_count_as_misses():
    ranks = ranks_of_targets(SCORES, [0, -1, 2])
    assert ranks[1] == np.inf
    assert recall_at_k(ranks, [10]) == {10: pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        recall_at_k([], [1])


def test_best_rank_over_several_targets():
    # image -> text: query 0 has captions 1 and 2 (ranks 3 and 2): best is 2; query 1 has none present
    assert list(best_ranks(SCORES[:2], [[1, 2], [-1]])) == [2, np.inf]


def test_tied_targets_do_not_count_against_each_other():
    # both columns are hits: neither stands ahead of the other
    assert list(best_ranks([[0.5, 0.5, 0.1]], [[0, 1]])) == [1]
    assert list(best_ranks([[0.4, 0.5, 0.5, 0.9]], [[0, 1, 2]])) == [2]  # only the 0.9 non-target is ahead
    # a non-target tied with the best target still counts against it, whatever the other targets
    assert list(best_ranks([[0.5, 0.5, 0.5]], [[0, 1]])) == [2]
    assert list(best_ranks([[0.5, 0.5, 0.5, 0.5]], [[0, 2]])) == [3]


def test_precision_at_k_by_label():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    p = precision_at_k(scores, ["a", "b"], ["a", "b", "b"], [1, 2, 10])
    assert p == {1: 1.0, 2: 0.75, 10: pytest.approx(0.5)}  # K=10 > 3 candidates: out of 3


def test_ann_recall_against_exact():
    assert ann_recall([[1, 2, 3], [7, 8, 9]], [[1, 2, 4], [9, 8, 7]], 3) == pytest.approx((2 / 3 + 1) / 2)
    assert ann_recall([[1, 2]], [[1, -1]], 2) == 1.0  # padding in the exact list is not a target


def test_plot_is_a_png(tmp_path):
    out = plot_recall({"text->image": {1: 0.1, 5: 0.4, 10: 0.6}, "image->text": {1: 0.2, 5: 0.5, 10: 0.7}},
                      str(tmp_path / "recall.png"))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
