"""The classifier-based sample scores: their function on synthetic inputs,
and a classifier of real digits that tells real images from noise."""

import math

import numpy as np
import pytest

from tfp_ffjord import datasets
from tfp_ffjord import sample_quality

# The bar for the scoring classifier; an untrained one scores ~0.1.
MIN_TEST_ACCURACY = 0.95
# Real held-out digits against uniform noise in the data's range (measured
# on digits: confidence 0.98 against 0.58).
CONFIDENCE_MARGIN = 0.2


def test_scores_of_one_hot_probabilities():
  scores = sample_quality.class_scores(np.eye(10)[np.arange(50) % 10])
  assert scores['confidence'] == 1.
  assert scores['class_entropy'] == pytest.approx(math.log(10))
  assert scores['max_class_entropy'] == pytest.approx(math.log(10))
  one_class = sample_quality.class_scores(np.eye(10)[[7] * 20])
  assert one_class['class_entropy'] == 0.
  # Two classes in equal numbers: ln 2.
  two = sample_quality.class_scores(np.eye(4)[[0, 1] * 5])
  assert two['class_entropy'] == pytest.approx(math.log(2))


def test_confidence_is_the_mean_top_probability():
  p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
  assert sample_quality.class_scores(p)['confidence'] == pytest.approx(0.65)
  uniform = np.full([6, 5], 0.2)
  assert sample_quality.class_scores(uniform)['confidence'] == pytest.approx(
      0.2)


@pytest.mark.parametrize('bad', [np.zeros([0, 10]), np.zeros(10)])
def test_bad_probabilities_are_refused(bad):
  with pytest.raises(ValueError, match='probabilities'):
    sample_quality.class_scores(bad)


def test_a_classifier_of_real_digits_scores_them_above_noise():
  data = datasets.load('digits')
  result = sample_quality.train_classifier(data, epochs=10)
  assert result.test_accuracy >= MIN_TEST_ACCURACY
  real = sample_quality.score(result.classifier, data.test)
  rng = np.random.default_rng(0)
  noise = sample_quality.score(result.classifier, rng.uniform(
      *result.classifier.value_range, size=data.test.shape))
  assert real['num_images'] == len(data.test) and real['non_finite'] == 0
  assert real['confidence'] > noise['confidence'] + CONFIDENCE_MARGIN
  # Held-out digits cover every class about evenly.
  assert real['class_entropy'] > 0.95 * math.log(10)
  # Failed (non-finite) samples are counted and still scored.
  broken = data.test[:10].copy()
  broken[:3, 5] = np.nan
  broken[3, 0] = np.inf
  scores = sample_quality.score(result.classifier, broken)
  assert scores['non_finite'] == 4 and np.isfinite(scores['confidence'])


def test_a_classifier_needs_labelled_images():
  with pytest.raises(ValueError, match='labelled image dataset'):
    sample_quality.train_classifier(datasets.load('moons', num_train=64,
                                                  num_test=64))
