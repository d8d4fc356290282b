"""Executes the Colab notebooks into docs/tutorials/, outputs included.

`colab/*.ipynb` are kept without outputs (what Colab opens); the docs render
executed copies of them. Run after changing a notebook (a full run, on a
2-core CPU, takes several minutes per notebook):

  python docs/execute_tutorials.py [NAME.ipynb ...]
"""

import os
import sys
import tempfile
import time

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
COLAB = os.path.join(HERE, os.pardir, 'colab')
OUT = os.path.join(HERE, 'tutorials')
CELL_TIMEOUT = 3600  # seconds


def strip_stderr(nb):
  """Drops what the kernel wrote to stderr (TensorFlow's start-up log lines,
  progress bars): the docs show the notebook's results."""
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs = [o for o in cell.outputs
                      if not (o.get('output_type') == 'stream'
                              and o.get('name') == 'stderr')]
  return nb


def execute(name):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  os.environ.pop('TFP_FFJORD_SMOKE', None)   # the full run
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as work:
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                            resources={'metadata': {'path': work}}).execute()
  os.makedirs(OUT, exist_ok=True)
  nbformat.write(strip_stderr(nb), os.path.join(OUT, name))
  return time.perf_counter() - start


def main(names):
  names = names or sorted(n for n in os.listdir(COLAB)
                          if n.endswith('.ipynb'))
  for name in names:
    print(f'{name}: {execute(name):.0f} s', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
