"""The Colab notebooks run top to bottom (TFP_FFJORD_SMOKE=1, real kernel).

Each notebook ends with a `results` dict; the test appends a cell that prints
it as JSON and checks the values the notebook computed, not only that it ran.
"""

import json
import os

import numpy as np
import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

COLAB = os.path.join(os.path.dirname(__file__), os.pardir, 'colab')
TUTORIALS = os.path.join(os.path.dirname(__file__), os.pardir, 'docs',
                         'tutorials')
NOTEBOOK_TIMEOUT = 900  # seconds per cell
# Nats the smoke-trained moons flow must beat the identity flow by.
LEARNED_MARGIN = 0.2
# Nats the smoke-fitted FFJORD surrogate of the VI notebook must gain over
# the untrained one (N(0, I)).
SMOKE_VI_GAIN = 0.5


def run_notebook(name, tmp_path):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(
      'import json as _json\nprint("RESULTS=" + _json.dumps(results))'))
  os.environ['TFP_FFJORD_SMOKE'] = '1'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    client = nbclient.NotebookClient(
        nb, timeout=NOTEBOOK_TIMEOUT, kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
  finally:
    del os.environ['TFP_FFJORD_SMOKE']
  for output in nb.cells[-1].outputs:
    for line in output.get('text', '').splitlines():
      if line.startswith('RESULTS='):
        return json.loads(line[len('RESULTS='):])
  raise AssertionError('the notebook printed no results')


def test_notebooks_have_no_outputs_and_a_colab_install_cell():
  for name in sorted(os.listdir(COLAB)):
    if not name.endswith('.ipynb'):
      continue
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
    first_code = next(c for c in nb.cells if c.cell_type == 'code')
    assert "'google.colab' in sys.modules" in first_code.source, name
    title = next(c for c in nb.cells if c.cell_type == 'markdown')
    assert 'colab.research.google.com/github/' in title.source, name
    assert f'/colab/{name})' in title.source, name
    assert any('References' in c.source for c in nb.cells
               if c.cell_type == 'markdown'), name


def test_the_docs_render_executed_copies_of_the_notebooks():
  """docs/tutorials/ holds each notebook with the outputs of a full run
  (docs/execute_tutorials.py), its cells the same as colab/'s."""
  names = sorted(n for n in os.listdir(COLAB) if n.endswith('.ipynb'))
  assert names == sorted(n for n in os.listdir(TUTORIALS)
                         if n.endswith('.ipynb'))
  for name in names:
    source = nbformat.read(os.path.join(COLAB, name), as_version=4)
    executed = nbformat.read(os.path.join(TUTORIALS, name), as_version=4)
    assert ([c.source for c in executed.cells]
            == [c.source for c in source.cells]), (
                f'docs/tutorials/{name} is out of date: run '
                f'python docs/execute_tutorials.py {name}')
    code = [c for c in executed.cells if c.cell_type == 'code']
    assert any(c.outputs for c in code), name
    assert not any(o.get('output_type') == 'error'
                   for c in code for o in c.outputs), name


@pytest.mark.slow
def test_ffjord_1d_gaussian(tmp_path):
  r = run_notebook('ffjord_1d_gaussian.ipynb', tmp_path)
  # Even the smoke run (20 Adam + 5 L-BFGS iterations) moves the flow onto
  # the target: samples near Normal(6, 0.7), a small total variation.
  assert abs(r['sample_mean'] - 6.) < 0.5
  assert r['total_variation'] < 0.1
  assert r['final_loss'] > r['entropy'] - 0.2
  # In 1-D, Rademacher probes give the exact trace; Gaussian ones scatter.
  assert r['rademacher_std'] < 1e-5
  assert abs(r['rademacher_mean'] - r['exact_mean_log_prob']) < 1e-4
  assert r['gaussian_std'] > 1e-3
  assert (tmp_path / 'pdf.png').stat().st_size > 5000


@pytest.mark.slow
def test_ffjord_moons(tmp_path):
  r = run_notebook('ffjord_moons.ipynb', tmp_path)
  assert r['num_traces'] == 1
  # The smoke run (32 steps of one block) must learn: an identity flow (the
  # base distribution alone) scores ~2.42 nats on these points, the
  # untrained flow ~2.66; 32 steps reach ~1.98.
  assert r['final_test_nll'] < r['identity_test_nll'] - LEARNED_MARGIN, r
  # The flow trained with Hutchinson's estimator (exact held-out NLL) must
  # learn as well.
  assert r['hutchinson_test_nll'] < r['identity_test_nll'] - LEARNED_MARGIN, r
  # Every solver (ours, TFP's, ours inside tfb.FFJORD) agrees on log p.
  for name, err in r['solver_errors'].items():
    assert err < 2e-3, name
  # Timed (never compared: no wall-clock assertions in tests).
  assert r['our_step_ms'] > 0 and r['tfp_step_ms'] > 0
  for png in ('panels_first.png', 'panels_last.png', 'density.png'):
    assert (tmp_path / 'figures' / png).stat().st_size > 5000


@pytest.mark.slow
def test_bijectors_basics(tmp_path):
  r = run_notebook('bijectors_basics.ipynb', tmp_path)
  assert r['normal_log_prob'] == pytest.approx(-2.938989, abs=1e-6)
  assert r['via_cdf'] == pytest.approx(-2.938989, abs=1e-5)
  np.testing.assert_allclose(r['affine_after'],
                             [-1.6120857, -1.7370857, -2.1120858], atol=1e-6)
  assert r['small_flow_nll'] < r['small_flow_initial_nll']
  assert r['mix_final'] < r['mix_initial']
  # The chain's log_prob is the brute-force change of variables.
  assert r['chain_error'] < 1e-3


@pytest.mark.slow
def test_hutchinson_trace(tmp_path):
  r = run_notebook('hutchinson_trace.ipynb', tmp_path)
  for dim, value in r['cube_log_density'].items():
    assert value == pytest.approx(-int(dim) * np.log(2.), abs=1e-5)
  assert r['instantaneous_error'] < 1e-7 and r['mapped_error'] < 1e-7
  for row in r['hutchinson']:
    for noise in ('gaussian', 'rademacher'):
      stats = row[noise]
      assert abs(stats['bias_in_se']) < 4.5, (row['dim'], noise)
      # Sample variance against theory. With 200 probes (smoke run) the
      # sample variance of a chi-square-like estimate has a relative
      # standard error up to ~26% (D=2, one dominant eigenvalue): 60% is
      # about 2.3 standard errors. (Probes are seeded: deterministic.)
      assert stats['var'] == pytest.approx(stats['theory_var'], rel=0.6)
    assert row['rademacher']['theory_var'] < row['gaussian']['theory_var']
  assert np.isfinite(r['exact_nll'])
  assert abs(r['unbiased_nll'] - r['exact_nll']) < 0.5


@pytest.mark.slow
def test_ffjord_vi(tmp_path):
  r = run_notebook('ffjord_vi.ipynb', tmp_path)
  assert r['solves_sample_and_log_prob'] == 1
  assert r['solves_sample_then_log_prob'] == 2
  # Banana is normalised: no ELBO may exceed 0 (beyond Monte Carlo noise).
  for kind, elbo in r['elbo'].items():
    assert elbo < 0.05, (kind, elbo)
  # 150 smoke steps move the FFJORD surrogate well away from N(0, I).
  assert r['elbo']['ffjord'] > r['untrained_elbo'] + SMOKE_VI_GAIN, r
  assert r['tfp_vi_last_loss'] < r['tfp_vi_first_loss']
  assert r['eight_schools_keys'] == ['avg_effect', 'log_stddev',
                                     'school_effects']
  assert r['eight_schools_last_loss'] < r['eight_schools_first_loss']
  assert (tmp_path / 'banana_surrogates.png').stat().st_size > 5000
  assert (tmp_path / 'elbo.png').stat().st_size > 5000
  # The staged surrogate on the funnel: both phases moved it from N(0, I),
  # and neither it nor the IAF exceeds log Z = 0.
  staged = r['funnel_elbo']['staged FFJORD on IAF']
  assert staged > r['funnel_untrained_elbo'] + SMOKE_VI_GAIN, r
  assert max(r['funnel_elbo'].values()) < 0.05, r
  assert (tmp_path / 'funnel_pairs.png').stat().st_size > 5000
