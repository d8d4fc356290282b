"""Sample quality of image models, scored by a classifier of real images.

A small Sonnet CNN trained on a dataset's real training images (`digits`,
`mnist`) classifies a model's samples. Two numbers summarise them:

* `confidence`: the mean of the top class probability. Recognisable digits
  score near the real images' value; strokes and blobs score low.
* `class_entropy`: the entropy (nats) of the histogram of predicted classes.
  Diverse samples approach `ln 10 = 2.303`; a model that draws one digit
  scores 0.

    classifier = sample_quality.train_classifier(data)
    classifier.accuracy(data.test, data.test_labels)
    sample_quality.score(classifier, samples)            # a model's
    sample_quality.score(classifier, data.test)          # real images'
"""

import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np
import sonnet as snt
import tensorflow as tf

from tfp_ffjord import _checks

__all__ = ['DigitClassifier', 'ClassifierResult', 'train_classifier',
           'class_scores', 'score']


class DigitClassifier(snt.Module):
  """A small CNN: two 3x3 convolutions with max pooling, then a linear map.

  Args:
    image_shape: `(height, width, channels)` of the images.
    num_classes: the number of classes.
    channels: the two convolutions' output channels.
    value_range: `(low, high)` of the real images' values; `score` clips
      samples to it.
    name: the module's name.
  """

  def __init__(self, image_shape: Sequence[int], num_classes: int = 10,
               channels: Sequence[int] = (32, 64),
               value_range: Sequence[float] = (0., 1.),
               name: Optional[str] = 'digit_classifier'):
    super().__init__(name=name)
    self.image_shape = tuple(int(s) for s in image_shape)
    self.num_classes = _checks.positive_int('num_classes', num_classes)
    self.value_range = tuple(float(v) for v in value_range)
    self._convs = [snt.Conv2D(c, 3, name=f'conv_{i}')
                   for i, c in enumerate(channels)]
    self._out = snt.Linear(self.num_classes, name='logits')

  def __call__(self, images):
    """Class logits `[N, num_classes]` of flattened images `[N, H * W * C]`."""
    h = tf.reshape(tf.convert_to_tensor(images, tf.float32),
                   (-1,) + self.image_shape)
    for conv in self._convs:
      h = tf.nn.max_pool2d(tf.nn.relu(conv(h)), 2, 2, 'SAME')
    return self._out(tf.reshape(h, [tf.shape(h)[0], -1]))

  def probabilities(self, images, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities `[N, num_classes]` (NumPy), in batches.

    Args:
      images: `[N, H * W * C]` images.
      batch_size: images per call.

    Returns:
      The softmax of the logits.
    """
    images = np.asarray(images, np.float32)
    parts = [tf.nn.softmax(self(images[i:i + batch_size])).numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(
        [0, self.num_classes], np.float32)

  def accuracy(self, images, labels) -> float:
    """The fraction of `images` whose most probable class is `labels`'.

    Args:
      images: `[N, H * W * C]` images.
      labels: `[N]` integer labels.

    Returns:
      The accuracy, in [0, 1].
    """
    predicted = np.argmax(self.probabilities(images), axis=1)
    return float(np.mean(predicted == np.asarray(labels)))


@dataclasses.dataclass
class ClassifierResult:
  """A trained classifier and how well it classifies held-out real images.

  Attributes:
    classifier: the trained `DigitClassifier`.
    test_accuracy: its accuracy on the dataset's test split.
  """
  classifier: DigitClassifier
  test_accuracy: float


def train_classifier(data, epochs: int = 20, batch_size: int = 128,
                     learning_rate: float = 2e-3,
                     seed: int = 0) -> ClassifierResult:
  """Trains a `DigitClassifier` on a dataset's real training images.

  Args:
    data: a labelled image `datasets.Dataset` (`digits`, `mnist`).
    epochs: passes over the training split.
    batch_size: images per Adam step.
    learning_rate: Adam's learning rate.
    seed: the weights' and the shuffling's seed.

  Returns:
    The classifier and its test-split accuracy.

  Raises:
    ValueError: if `data` has no image shape or no labels.
  """
  if data.image_shape is None or data.train_labels is None:
    raise ValueError(f'`data` must be a labelled image dataset (digits, '
                     f'mnist); got {data.name!r}.')
  epochs = _checks.positive_int('epochs', epochs)
  tf.random.set_seed(seed)
  classifier = DigitClassifier(
      data.image_shape, num_classes=int(data.num_classes),
      value_range=(float(data.train.min()), float(data.train.max())))
  optimizer = snt.optimizers.Adam(learning_rate)
  x = tf.constant(data.train, tf.float32)
  y = tf.constant(data.train_labels, tf.int32)

  @tf.function
  def step(images, labels):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels, classifier(images)))
    variables = classifier.trainable_variables
    optimizer.apply(tape.gradient(loss, variables), variables)
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(data.train))
    for i in range(0, len(order), batch_size):
      idx = order[i:i + batch_size]
      step(tf.gather(x, idx), tf.gather(y, idx))
  return ClassifierResult(classifier, classifier.accuracy(data.test,
                                                          data.test_labels))


def class_scores(probabilities) -> Dict[str, float]:
  """The two sample-quality numbers of a set of class probabilities.

  Args:
    probabilities: `[N, K]` class probabilities of N images.

  Returns:
    `{'confidence': mean top probability, 'class_entropy': entropy in
    nats of the histogram of predicted classes, 'max_class_entropy':
    ln K}`.

  Raises:
    ValueError: for an empty or non-2-D input.

  Examples:
    >>> round(class_scores(np.eye(10))['class_entropy'], 4)   # all classes
    2.3026
    >>> class_scores(np.eye(10)[[3, 3, 3]])                   # one class
    {'confidence': 1.0, 'class_entropy': 0.0, 'max_class_entropy': 2.302585092994046}
  """
  p = np.asarray(probabilities, np.float64)
  if p.ndim != 2 or not p.size:
    raise ValueError('`probabilities` must be a non-empty [N, K] array; got '
                     f'shape {p.shape}.')
  counts = np.bincount(np.argmax(p, axis=1), minlength=p.shape[1])
  freq = counts[counts > 0] / counts.sum()
  return {'confidence': float(np.mean(np.max(p, axis=1))),
          'class_entropy': float(-np.sum(freq * np.log(freq)) + 0.),
          'max_class_entropy': math.log(p.shape[1])}


def score(classifier: DigitClassifier, images) -> Dict[str, float]:
  """`class_scores` of images, e.g. a model's samples.

  Args:
    classifier: a trained `DigitClassifier`.
    images: `[N, H * W * C]` images, clipped first to the classifier's
      `value_range` (a flow's samples can stray outside the data's). A
      non-finite value counts as the range's low end (NaN, -inf) or high
      end (+inf), so a model's failed samples score as what they show.

  Returns:
    The scores, `'num_images'`, and `'non_finite'`: the images with a
    non-finite value.
  """
  images = np.asarray(images, np.float32)
  low, high = classifier.value_range
  non_finite = int(np.sum(~np.all(np.isfinite(images), axis=-1)))
  images = np.clip(np.nan_to_num(images, nan=low, posinf=high, neginf=low),
                   low, high)
  scores = class_scores(classifier.probabilities(images))
  scores['num_images'] = len(images)
  scores['non_finite'] = non_finite
  return scores
