"""The persistent XLA compilation cache (`tfp_ffjord.compilation_cache`)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfp_ffjord import compilation_cache

# A child process: tfp_ffjord first (it reads TFP_FFJORD_XLA_CACHE), then
# TensorFlow, then one XLA-compiled function.
CHILD = '''
import tfp_ffjord
import tensorflow as tf

@tf.function(jit_compile=True)
def f(x):
  return tf.reduce_sum(tf.sin(x) * tf.exp(-x ** 2))

print('VALUE', float(f(tf.linspace(0., 3., 64))))
'''


def _run_child(cache):
  env = dict(os.environ, TFP_FFJORD_XLA_CACHE=str(cache),
             TF_CPP_MIN_LOG_LEVEL='0',
             TF_CPP_VMODULE='device_executable_persistor=1')
  env.pop('TF_XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', CHILD], env=env,
                          capture_output=True, text=True, check=False,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  value = [float(line.split()[1]) for line in result.stdout.splitlines()
           if line.startswith('VALUE')]
  return value[0], 'Loading cached entry' in result.stderr


def _entries(directory):
  return sorted(n for n in os.listdir(directory)
                if n.startswith(compilation_cache.prefix()))


def _valid_proto():
  graph = tf.Graph()
  with graph.as_default():
    tf.constant(np.arange(100.), name='c')
    tf.identity(tf.constant(1.), name='i')
  return graph.as_graph_def().SerializeToString()


def test_is_intact_tells_whole_entries_from_truncated_ones(tmp_path):
  data = _valid_proto()
  whole = tmp_path / 'whole.pb'
  whole.write_bytes(data)
  assert compilation_cache.is_intact(str(whole))
  for cut in (1, len(data) // 2, len(data) - 1):
    part = tmp_path / f'part{cut}.pb'
    part.write_bytes(data[:cut])
    assert not compilation_cache.is_intact(str(part)), cut
  empty = tmp_path / 'empty.pb'
  empty.write_bytes(b'')
  assert not compilation_cache.is_intact(str(empty))
  # Cut exactly between top-level fields: whole, but too few fields.
  graph = tf.compat.v1.GraphDef.FromString(data)
  fields = len(graph.node) + 1            # the nodes, then `versions`
  cut = tmp_path / 'between.pb'
  cut.write_bytes(data[:len(data) - len(
      tf.compat.v1.GraphDef(versions=graph.versions).SerializeToString())])
  assert compilation_cache.is_intact(str(cut))
  assert not compilation_cache.is_intact(str(cut), min_fields=fields)
  assert compilation_cache.is_intact(str(whole), min_fields=fields)
  assert not compilation_cache.is_intact(str(tmp_path / 'missing.pb'))


def test_tidy_removes_truncated_then_oldest_of_ours_only(tmp_path):
  data = _valid_proto()
  ours = compilation_cache.prefix()
  paths = []
  for i in range(3):
    path = tmp_path / f'{ours}__{i}__XLA_CPU_JIT.pb'
    path.write_bytes(data)
    os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    paths.append(path)
  truncated = tmp_path / f'{ours}__9__XLA_CPU_JIT.pb'
  truncated.write_bytes(data[:-3])
  foreign = tmp_path / 'xla_compile_cache__1__XLA_CPU_JIT.pb'
  foreign.write_bytes(b'not ours')
  compilation_cache.tidy(str(tmp_path), max_bytes=2 * len(data))
  assert not truncated.exists()
  assert foreign.exists()
  assert [p.exists() for p in paths] == [False, True, True]


def test_tidy_reads_each_entry_once_until_it_changes(tmp_path, monkeypatch):
  data = _valid_proto()
  ours = compilation_cache.prefix()
  paths = [tmp_path / f'{ours}__{i}__XLA_CPU_JIT.pb' for i in range(3)]
  for path in paths:
    path.write_bytes(data)
  read = []
  real = compilation_cache.is_intact
  monkeypatch.setattr(
      compilation_cache, 'is_intact',
      lambda p, **kw: read.append(os.path.basename(p)) or real(p, **kw))
  compilation_cache.tidy(str(tmp_path))
  assert sorted(read) == sorted(p.name for p in paths)
  del read[:]
  compilation_cache.tidy(str(tmp_path))
  assert read == []
  # Rewritten (here: truncated, with a new time): read again, and removed.
  paths[1].write_bytes(data[:len(data) // 2])
  os.utime(paths[1], ns=(time.time_ns() + 10**9,) * 2)
  compilation_cache.tidy(str(tmp_path))
  assert read == [paths[1].name]
  assert not paths[1].exists() and paths[0].exists() and paths[2].exists()


def test_enable_refuses_once_tensorflow_is_imported(monkeypatch):
  monkeypatch.delenv('TF_XLA_FLAGS', raising=False)
  with pytest.raises(RuntimeError, match='before TensorFlow is imported'):
    compilation_cache.enable('/tmp/never')
  # The automatic set-up quietly does nothing then.
  monkeypatch.setenv(compilation_cache.ENV, '1')
  assert compilation_cache.configure(default_on=True) is None
  assert 'TF_XLA_FLAGS' not in os.environ


def test_configure_respects_a_directory_already_in_tf_xla_flags(monkeypatch):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv('TF_XLA_FLAGS',
                     '--tf_xla_persistent_cache_directory=/some/dir')
  assert compilation_cache.configure(default_on=False) == '/some/dir'
  monkeypatch.setenv(compilation_cache.ENV, '0')
  assert compilation_cache.configure(default_on=True) is None


@pytest.mark.slow
def test_second_process_loads_the_executable_and_truncated_entries_go(
    tmp_path):
  """Process 1 compiles and writes an entry; process 2 loads it (same
  value); a truncated entry, which TensorFlow would fail the compilation
  on, is removed at set-up and process 3 compiles again."""
  cache = tmp_path / 'xla'
  first, hit = _run_child(cache)
  assert not hit
  entries = _entries(cache)
  assert len(entries) == 1, os.listdir(cache)
  second, hit = _run_child(cache)
  assert hit
  assert second == first
  assert _entries(cache) == entries

  path = cache / entries[0]
  path.write_bytes(path.read_bytes()[:-100])
  third, hit = _run_child(cache)
  assert not hit
  assert third == first
  assert compilation_cache.is_intact(str(cache / _entries(cache)[0]))


# ------------------------------------- trusted input only (who may write it)


def test_directories_others_could_write_are_untrusted(tmp_path, monkeypatch):
  ours = tmp_path / 'ours'
  ours.mkdir(mode=0o700)
  assert compilation_cache.untrusted(str(ours)) is None
  for mode in (0o777, 0o770, 0o702, 0o1777):
    os.chmod(ours, mode)
    why = compilation_cache.untrusted(str(ours))
    assert why and f'mode {mode & 0o777:04o}' in why and 'chmod go-w' in why
  os.chmod(ours, 0o755)   # others may read, not write: fine
  assert compilation_cache.untrusted(str(ours)) is None
  monkeypatch.setattr(compilation_cache, '_uid', lambda: os.geteuid() + 1)
  why = compilation_cache.untrusted(str(ours))
  assert why and f'uid {os.geteuid()}' in why and compilation_cache.ENV in why


def test_tidy_deletes_entries_this_user_did_not_write(tmp_path, monkeypatch):
  data = _valid_proto()
  ours = compilation_cache.prefix()
  mine = tmp_path / f'{ours}__1__XLA_CPU_JIT.pb'
  mine.write_bytes(data)
  elsewhere = tmp_path / 'elsewhere.pb'
  elsewhere.write_bytes(data)
  link = tmp_path / f'{ours}__2__XLA_CPU_JIT.pb'
  link.symlink_to(elsewhere)
  compilation_cache.tidy(str(tmp_path))
  assert mine.exists() and not os.path.lexists(link) and elsewhere.exists()
  # Another user's entry (a real chown as root, else seen as another user).
  theirs = tmp_path / f'{ours}__3__XLA_CPU_JIT.pb'
  theirs.write_bytes(data)
  if os.geteuid() == 0:
    os.chown(theirs, 65534, 65534)
  else:
    monkeypatch.setattr(compilation_cache, '_uid', lambda: os.geteuid() + 1)
  compilation_cache.tidy(str(tmp_path))
  assert not theirs.exists()
  assert mine.exists() == (os.geteuid() == 0)


def test_a_cache_others_can_write_is_refused_with_a_warning(tmp_path):
  """A new process asked to use a world-writable directory compiles
  without the cache and says why."""
  shared = tmp_path / 'shared'
  shared.mkdir()
  os.chmod(shared, 0o777)
  env = dict(os.environ, TFP_FFJORD_XLA_CACHE=str(shared))
  env.pop('TF_XLA_FLAGS', None)
  res = subprocess.run([sys.executable, '-c', CHILD], env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'XLA compilation cache off' in res.stderr, res.stderr[-3000:]
  assert 'chmod go-w' in res.stderr
  assert os.listdir(shared) == []
  # (A new directory is created 0700: test_six_processes_on_one_cache_at_once.)


# ------------------------------------------------------- warm runs are quiet

TINY_TRAIN = ['train', '--dataset', 'moons', '--num-train', '256',
              '--num-test', '128', '--batch-size', '64', '--blocks', '1',
              '--hidden', '8', '--solver', 'rk4', '--num-steps', '4',
              '--no-progress', '--epochs', '1']


@pytest.mark.slow
def test_a_warm_command_line_run_prints_no_error_lines(tmp_path):
  """The second run loads what the first compiled, and TensorFlow's
  complaints about reading entries as text do not reach the user."""
  cache = tmp_path / 'cache'
  env = dict(os.environ, TFP_FFJORD_XLA_CACHE=str(cache))
  for name in ('TF_CPP_MIN_LOG_LEVEL', 'TF_XLA_FLAGS'):
    env.pop(name, None)   # the command line's own logging set-up
  runs = []
  for i in range(2):
    res = subprocess.run(
        [sys.executable, '-m', 'tfp_ffjord', *TINY_TRAIN, '--out',
         str(tmp_path / f'run{i}')], env=env, capture_output=True,
        text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs.append((res.stderr, {e: os.stat(cache / e).st_mtime_ns
                              for e in _entries(cache)}))
  (_, cold), (warm_err, warm) = runs
  assert cold and warm == cold   # loaded, not compiled again
  assert warm_err.strip() == '', warm_err[-3000:]


SHARED_CHILD = '''
import sys
import tfp_ffjord
import tensorflow as tf

@tf.function(jit_compile=True)
def f(x):
  return tf.reduce_sum(tf.sin(x) * tf.exp(-x ** 2) * float(sys.argv[1]))

print('VALUE', float(f(tf.linspace(0., 3., 64))))
'''


@pytest.mark.slow
def test_six_processes_on_one_cache_at_once(tmp_path):
  """Three load an entry while three write new ones: all succeed and
  agree with each other."""
  cache = tmp_path / 'xla'
  env = dict(os.environ, TFP_FFJORD_XLA_CACHE=str(cache))
  env.pop('TF_XLA_FLAGS', None)

  def start(scale):
    return subprocess.Popen([sys.executable, '-c', SHARED_CHILD, str(scale)],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  first = start(1)
  assert first.wait(timeout=300) == 0, first.communicate()
  assert 'cache off' not in first.communicate()[1]
  assert os.stat(cache).st_mode & 0o777 == 0o700   # created for us only
  before = _entries(cache)
  assert len(before) == 1
  procs = [start(1) for _ in range(3)] + [start(s) for s in (2, 3, 4)]
  values = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    values.append(float(out.split()[-1]))
  assert values[0] == values[1] == values[2]
  np.testing.assert_allclose(values[3:], [2 * values[0], 3 * values[0],
                                          4 * values[0]], rtol=1e-6)
  assert len(_entries(cache)) == 4
