"""The one packing layer (`tfp_ffjord._packing.Packing`) that stacked
modules' variables and the adjoint's state and cotangents go through."""

import numpy as np
import tensorflow as tf

from tfp_ffjord._packing import Packing


def test_groups_lead_and_apart_round_trip_in_order():
  rng = np.random.default_rng(0)
  shapes = [(2, 3), (), (4,), (1, 2), (5,)]
  keys = ['a', None, 'b', 'a', None]
  values = [tf.constant(rng.normal(size=(7,) + s)) for s in shapes]
  packing = Packing(shapes, keys)
  packed = packing.pack(values, lead=None)   # [K, ...] values, K = 7
  assert packing.num_packed == len(packed) == 4
  # Group 'a' (first appearance) is values 0 and 3 flattened in order,
  # then group 'b', then the values left apart, in order.
  np.testing.assert_array_equal(packed[0], np.concatenate(
      [values[0].numpy().reshape(7, 6), values[3].numpy().reshape(7, 2)], 1))
  np.testing.assert_array_equal(packed[1], values[2])
  assert packed[2] is values[1] and packed[3] is values[4]
  for got, want in zip(packing.unpack(packed), values):
    np.testing.assert_array_equal(got, want)
  # A row of the packed Tensors unpacks to one value per Tensor (no lead).
  row = packing.unpack([p[3] for p in packed[:2]] + packed[2:])
  np.testing.assert_array_equal(row[0], values[0][3])
  np.testing.assert_array_equal(row[3], values[3][3])


def test_an_explicit_lead_flags_and_zeros():
  shapes = [(2,), (3,), ()]
  packing = Packing(shapes, [0, 0, None])
  lead = [tf.constant(4)]   # a dynamic leading dimension
  values = [tf.ones([4, 2]), 2. * tf.ones([4, 3]), tf.zeros([4])]
  packed = packing.pack(values, lead=lead)
  assert packed[0].shape == (4, 5)
  np.testing.assert_array_equal(packed[0][0], [1., 1., 2., 2., 2.])
  flags = packing.pack_flags([True, False, True])
  np.testing.assert_array_equal(flags[0], [True, True, False, False, False])
  assert flags[1] is True
  zeros = packing.zeros([tf.float32, tf.float32, tf.float64])
  assert [z.shape for z in zeros] == [(5,), ()]
  assert zeros[1].dtype == tf.float64
