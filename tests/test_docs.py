"""The documentation: the site builds offline and strict, the README stays one
screen, its example trains, and a wheel built from the tree is complete."""

import html
import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250
# A proxy nothing listens on: any fetch during the build fails it.
CLOSED_PORT_PROXY = 'http://127.0.0.1:9'


def read(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  pytest.importorskip('mkdocs')
  out = tmp_path_factory.mktemp('site')
  env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
  for key in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy',
              'ALL_PROXY', 'all_proxy'):
    env[key] = CLOSED_PORT_PROXY
  env.pop('NO_PROXY', None)
  env.pop('no_proxy', None)
  result = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir',
       str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def page(site, path):
  with open(os.path.join(site, path, 'index.html')) as f:
    return f.read()


def test_the_site_builds_strict_and_offline(site):
  assert os.path.exists(os.path.join(site, 'index.html'))
  assert os.path.exists(os.path.join(site, 'search', 'search_index.json'))
  # No web fonts: the theme uses the system's.
  assert 'fonts.googleapis.com' not in page(site, '.')


def test_every_notebook_is_rendered_with_its_outputs(site):
  names = [n[:-len('.ipynb')] for n in os.listdir(os.path.join(ROOT, 'colab'))
           if n.endswith('.ipynb')]
  assert len(names) == 5
  with_figures = 0
  for name in names:
    text = page(site, os.path.join('tutorials', name))
    assert 'colab-badge.svg' in text, name
    # Stored outputs (an output area per cell that printed or showed
    # something; none in a notebook without outputs), figures as inline PNGs.
    assert text.count('<div class="jp-OutputArea-child') >= 3, name
    with_figures += 'data:image/png;base64' in text
  # The moons, 1-D Gaussian and VI notebooks draw figures.
  assert with_figures >= 3


def test_the_api_pages_render_every_docstring(site):
  text = ''
  for name in os.listdir(os.path.join(site, 'api')):
    path = os.path.join(site, 'api', name, 'index.html')
    if os.path.exists(path):
      with open(path) as f:
        text += f.read()
  for obj in ('tfp_ffjord.bijector.FFJORD', 'tfp_ffjord.ode.solvers.Solver',
              'tfp_ffjord.training.trainer.Trainer',
              'tfp_ffjord.vi.surrogates.build_ffjord_surrogate_posterior'):
    assert f'id="{obj}"' in text, obj
  # A docstring's Args became a parameter table.
  assert 'state_time_derivative_fn' in text


def test_the_benchmarks_page_shows_its_figures(site):
  text = page(site, 'benchmarks')
  images = re.findall(r'<img[^>]*src="([^"]+\.png)"', text)
  assert len(images) >= 5, images
  for src in images:
    path = os.path.normpath(os.path.join(site, 'benchmarks',
                                         html.unescape(src)))
    assert os.path.getsize(path) > 10_000, src


def test_readme_is_one_screen_and_opens_with_the_two_commands():
  text = read('README.md')
  assert len(text.splitlines()) <= README_MAX_LINES
  block = text.split('```bash\n', 1)[1].split('```', 1)[0]
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert 'tfp-ffjord train' in commands[0]
  assert 'pytest' in commands[1] and '.[test]' in commands[1]
  # Every relative link of the README points at a file of the tree.
  for target in re.findall(r'\]\(([^)#]+)\)', text):
    if '://' not in target:
      assert os.path.exists(os.path.join(ROOT, target)), target


def test_the_version_lives_in_one_place():
  init = read('tfp_ffjord/__init__.py')
  versions = re.findall(r"^__version__ = '([^']+)'", init, re.M)
  assert len(versions) == 1
  assert 'version = attr: tfp_ffjord.__version__' in read('setup.cfg')
  assert f'## {versions[0]}' in read('CHANGELOG.md')
  assert 'Apache License' in read('LICENSE')


@pytest.mark.slow
def test_the_getting_started_example_trains():
  """The swap example of docs/getting-started.md, as written, under XLA."""
  code = re.findall(r'```python\n(.*?)```', read('docs/getting-started.md'),
                    re.S)[0]
  script = code + '''
import numpy as np
from sklearn.datasets import make_moons
x = make_moons(256, noise=.06, random_state=0)[0].astype(np.float32)
losses = [float(train_step(x)) for _ in range(15)]
print(losses[0], losses[-1])
'''
  result = subprocess.run([sys.executable, '-c', script], capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 0, result.stderr[-3000:]
  first, last = (float(v) for v in result.stdout.split()[-2:])
  # An untrained flow (the identity at first) scores the base density's NLL
  # on the moons; training must lower it.
  assert last < first - 0.3


@pytest.mark.slow
def test_a_wheel_built_from_the_tree_holds_the_package(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', ROOT, '--no-deps',
       '--no-build-isolation', '-q', '-w', str(tmp_path)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  wheel, = [n for n in os.listdir(tmp_path) if n.endswith('.whl')]
  assert wheel.startswith('tfp_ffjord-0.1.0-')
  names = zipfile.ZipFile(tmp_path / wheel).namelist()
  packages = {os.path.dirname(n) for n in names
              if n.startswith('tfp_ffjord/') and n.endswith('__init__.py')}
  source = {os.path.relpath(d, ROOT) for d, _, files in os.walk(
      os.path.join(ROOT, 'tfp_ffjord')) if '__init__.py' in files}
  assert packages == source
  for module in ('tfp_ffjord/bijector.py', 'tfp_ffjord/ode/solvers.py',
                 'tfp_ffjord/training/trainer.py', 'tfp_ffjord/vi/job.py'):
    assert module in names
  assert not any(n.startswith(('tests/', 'benchmarks/', 'docs/'))
                 for n in names)
  info = [n for n in names if n.endswith('.dist-info/METADATA')][0]
  metadata = zipfile.ZipFile(tmp_path / wheel).read(info).decode()
  assert 'Version: 0.1.0' in metadata
  assert 'Requires-Dist: tensorflow-probability' in metadata
  assert any(n.endswith('LICENSE') for n in names)
  entry_points = [n for n in names if n.endswith('entry_points.txt')][0]
  assert 'tfp-ffjord = tfp_ffjord.cli:main' in zipfile.ZipFile(
      tmp_path / wheel).read(entry_points).decode()
