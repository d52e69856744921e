"""LVIS repeat-factor sampling: hand-computed factors, stochastic rounding, seeding, rare images drawn more."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.data.coco import ImageRecord
from detection.data.sampling import RepeatFactorSampler, repeat_factors


def _records(labels_per_image: list[list[int]]) -> list[ImageRecord]:
    return [
        ImageRecord(i, Path(f"img{i}.png"), 32, 32, np.tile(np.float32([[1, 1, 9, 9]]), (len(labels), 1)),
                    np.array(labels, np.int64), np.zeros(len(labels), np.int64), None, f"synthetic.json#{i}")
        for i, labels in enumerate(labels_per_image)
    ]


# 10 images: class 1 in images 0..8, class 2 in image 0 (twice), class 3 in images 1 and 2, image 9 empty
RECORDS = _records([[1, 2, 2], [1, 3], [1, 3], [1], [1], [1], [1], [1], [1], []])


def test_repeat_factors_by_hand():
    factors = repeat_factors(RECORDS, threshold=0.3)
    # f_1 = 9/10 -> r_1 = max(1, sqrt(0.3 / 0.9)) = 1
    # f_2 = 1/10 -> r_2 = sqrt(0.3 / 0.1) = sqrt(3) = 1.7320508 (a class counts once per image)
    # f_3 = 2/10 -> r_3 = sqrt(0.3 / 0.2) = sqrt(1.5) = 1.2247449
    # r_i = max over the image's classes; the empty image 9 gets 1
    expected = [math.sqrt(3), math.sqrt(1.5), math.sqrt(1.5), 1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(factors, expected)
    # a lower threshold repeats less: t = 0.1 -> r_2 = sqrt(0.1 / 0.1) = 1, r_3 = max(1, sqrt(0.5)) = 1
    np.testing.assert_allclose(repeat_factors(RECORDS, threshold=0.1), np.ones(10))


def test_repeat_factors_edge_cases():
    assert repeat_factors([], threshold=0.3).shape == (0,)
    np.testing.assert_array_equal(repeat_factors(_records([[], []])), [1.0, 1.0])  # only empty images
    with pytest.raises(ValueError, match=r"`threshold > 0` must hold, but got \(threshold=0\)"):
        repeat_factors(RECORDS, threshold=0)


def test_each_epoch_rounds_stochastically_and_rare_images_are_drawn_more():
    factors = repeat_factors(RECORDS, threshold=0.3)
    sampler = RepeatFactorSampler(factors, seed=0)
    totals = Counter()
    num_epochs = 400
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        draw = list(sampler)
        assert len(draw) == len(sampler)
        counts = Counter(draw)
        for i, r in enumerate(factors):
            assert counts[i] in (math.floor(r), math.ceil(r))  # floor(r) + Bernoulli(r - floor(r))
        totals.update(draw)
    means = np.array([totals[i] / num_epochs for i in range(10)])
    # E[count] = r; the std of a mean of 400 Bernoulli(0.73) is 0.022, so 0.08 is > 3.5 sigma
    np.testing.assert_allclose(means, factors, atol=0.08)
    assert means[0] > means[1] > means[3] == 1.0


def test_seeded_per_epoch():
    factors = np.array([1.5, 2.25, 1.0, 3.0])
    a, b, c = RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=2)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    draws = set()
    for epoch in range(4):
        c.set_epoch(epoch)
        draws.add(tuple(c))
    assert len(draws) > 1  # epochs differ
    a.set_epoch(0)
    c.set_epoch(0)
    assert list(a) != list(c)  # seeds differ
    assert list(RepeatFactorSampler(factors, seed=1, shuffle=False)) == sorted(list(a))


def test_sampler_drives_a_dataloader():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    sampler = RepeatFactorSampler(repeat_factors(RECORDS), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    seen = torch.cat([batch for (batch,) in loader]).tolist()
    assert sorted(seen) == sorted(sampler) and set(seen) == set(range(10))
    assert len(loader) == math.ceil(len(sampler) / 4)


def test_bad_repeat_factors():
    with pytest.raises(ValueError, match="finite repeat factors >= 1, but got min 0.5"):
        RepeatFactorSampler([1.0, 0.5], seed=0)
    with pytest.raises(ValueError, match="at least one image"):
        RepeatFactorSampler([], seed=0)


def test_deepforest_rare_class_tile_is_repeated(deepforest_index):
    records = [r for r in deepforest_index.images if r.split != "test"]
    factors = repeat_factors(records, threshold=0.3)
    rare = [i for i, r in enumerate(records) if {2, 3} & set(r.labels.tolist())]  # Dead, Alive
    assert len(rare) == 1
    # Dead and Alive are in 1 of the 38 train + valid tiles: r = sqrt(0.3 / (1 / 38)) = sqrt(11.4) = 3.376
    assert len(records) == 38
    assert factors[rare[0]] == pytest.approx(math.sqrt(0.3 * 38))
    assert np.all(np.delete(factors, rare) == 1.0)
