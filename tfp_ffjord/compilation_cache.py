"""A persistent XLA compilation cache shared by processes.

The first call of a compiled training step spends most of its time in XLA
(about 3.7 s of 4.8 s for the seed moons model on a 2-core CPU). TensorFlow
can keep the compiled executables on disk and load them in a later process
(`TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`); then a second
`tfp-ffjord train` of the same model, a `--resume` or a re-run notebook
pays only tracing and loading (measured: 0.75 s instead of 3.8 s).

TensorFlow reads that flag once, when it is imported, so the cache must be
set up before: `tfp-ffjord` does it itself (on by default; `--no-xla-cache`
or `TFP_FFJORD_XLA_CACHE=0` turn it off), and a script or notebook calls
`tfp_ffjord.compilation_cache.enable()` before `import tensorflow`, or sets
`TFP_FFJORD_XLA_CACHE=1` (or a directory) before `import tfp_ffjord`.

What keeps it safe:
  * entries are keyed by the whole HLO module (TensorFlow compares it in
    full before using an entry), so only an identical computation hits;
  * the file names carry the TensorFlow version and a fingerprint of the
    CPU (model and instruction sets), so an upgrade or another machine
    sharing the directory never loads an executable built by another XLA or
    for other instructions;
  * TensorFlow fails a compilation whose entry cannot be read, so truncated
    entries (a process killed while writing) are deleted when the cache is
    set up, and the oldest entries go once the directory outgrows
    `MAX_BYTES`;
  * a directory that cannot be written leaves the cache off (with a warning);
  * it runs only what this user wrote: TensorFlow loads and runs any entry
    it finds, so the directory is created with mode 0700, one that another
    user owns or that group or others may write is refused (cache off, with
    a warning saying how to fix it, as ssh refuses such key files), and
    entries owned by another user are deleted, unread.

Not covered: two processes that compile the same computation at the same
moment can race on its file. Give concurrent jobs their own directories
(`TFP_FFJORD_XLA_CACHE=/path/per/job`).

A hit needs the same HLO, names included. TensorFlow's graph passes name
the nodes they add `<name>/_<n>`, counting in an order that can change from
process to process; our compiled steps hold no such names (a test checks the
Trainer's), so every process after the first loads. A custom dynamics module
could still bring some in; its steps would then compile again now and then.

This module imports nothing from TensorFlow.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
from typing import Optional

ENV = 'TFP_FFJORD_XLA_CACHE'
MAX_BYTES = 1 << 30   # 1 GiB; the seed model's training step is ~2.5 MB.
CHECKED_FILE = 'tfp_ffjord_checked.json'   # entries already found whole
_ENTRY_FIELDS = 3   # an XlaSerializedCacheEntry: key, HLO module, executable
_DIR_FLAG = '--tf_xla_persistent_cache_directory'
_PREFIX_FLAG = '--tf_xla_persistent_cache_prefix'
_NAME = 'tfp_ffjord'   # every entry of ours starts with this
_OFF = ('0', 'false', 'off', 'no')
_ON = ('1', 'true', 'on', 'yes')

_LOG = logging.getLogger('tfp_ffjord')


def default_directory() -> str:
  """`$XDG_CACHE_HOME/tfp_ffjord/xla`, or `~/.cache/tfp_ffjord/xla`."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'tfp_ffjord', 'xla')


def cpu_fingerprint() -> str:
  """8 hex digits naming this CPU: its model and instruction-set flags.

  TensorFlow keys cache entries by HLO and device type only, and loads an
  executable compiled for other instructions than the host's (a cache in a
  home directory shared by different machines) with a warning that it may
  crash with SIGILL. Entries are kept apart per CPU instead.
  """
  text = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key = line.split(':', 1)[0].strip()
        if key in ('model name', 'flags', 'Features', 'CPU part'):
          text += line
        elif not line.strip() and text:
          break   # the first processor is enough
  except OSError:
    pass
  text += '|'.join((platform.machine(), platform.processor(),
                    platform.system()))
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def prefix() -> str:
  """The entries' file-name prefix: ours, the TensorFlow version, the CPU."""
  version = 'unknown'
  for dist in ('tensorflow', 'tensorflow-cpu', 'tf-nightly'):
    try:
      version = importlib.metadata.version(dist)
      break
    except importlib.metadata.PackageNotFoundError:
      continue
  version = ''.join(c if c.isalnum() or c in '.-' else '_' for c in version)
  return f'{_NAME}_tf{version}_cpu{cpu_fingerprint()}'


def _varint(data: bytes, pos: int):
  value = shift = 0
  while True:
    if pos >= len(data) or shift > 63:
      raise ValueError('truncated varint')
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7f) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def is_intact(path: str, min_fields: int = 1) -> bool:
  """Whether `path` is a whole protocol buffer: at least `min_fields`
  top-level fields, the last ending exactly at the end of the file.

  A file cut inside a field fails the second test; one cut exactly between
  fields has too few of them (a cache entry has 3: its key, its HLO and the
  executable, which `tidy` asks for).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return False
  pos = fields = 0
  try:
    while pos < len(data):
      fields += 1
      tag, pos = _varint(data, pos)
      wire = tag & 7
      if tag >> 3 == 0:
        return False
      if wire == 0:
        _, pos = _varint(data, pos)
      elif wire == 1:
        pos += 8
      elif wire == 2:
        size, pos = _varint(data, pos)
        pos += size
      elif wire == 5:
        pos += 4
      else:
        return False
  except ValueError:
    return False
  return pos == len(data) and fields >= max(min_fields, 1)


def _uid() -> int:
  return os.geteuid()


def untrusted(directory: str) -> Optional[str]:
  """Why `directory` cannot hold executables this process will run, or
  None: it must be owned by this user and writable by no one else."""
  st = os.stat(directory)
  if st.st_uid != _uid():
    return (f'is owned by another user (uid {st.st_uid}); use a directory '
            f'of your own ({ENV}=DIR)')
  if st.st_mode & 0o022:
    return (f'is writable by other users (mode {st.st_mode & 0o777:04o}); '
            f'`chmod go-w {directory}` fixes it')
  return None


def tidy(directory: str, max_bytes: int = MAX_BYTES) -> None:
  """Deletes entries owned by another user, our truncated entries, then
  the oldest until the entries fit in `max_bytes` (entries of every
  TensorFlow version and CPU count).

  An entry is read once: those found whole are listed, with their size and
  modification time, in `CHECKED_FILE`, and skipped while both are the same.
  """
  checked_path = os.path.join(directory, CHECKED_FILE)
  try:
    with open(checked_path) as f:
      if os.fstat(f.fileno()).st_uid != _uid():
        raise ValueError('not ours')   # a list we did not write: unused
      checked = json.load(f)
    if not isinstance(checked, dict):
      checked = {}
  except (OSError, ValueError):
    checked = {}
  entries, whole = [], {}
  for entry in os.scandir(directory):
    if not (entry.name.startswith(_NAME) and entry.name.endswith('.pb')):
      continue
    stat = entry.stat(follow_symlinks=False)
    if entry.is_symlink() or stat.st_uid != _uid():
      # TensorFlow would load it as ours: it goes, unread.
      _LOG.warning('Removing an XLA cache entry this user did not write: %s',
                   entry.path)
      os.remove(entry.path)
      continue
    if not entry.is_file():
      continue
    signature = [stat.st_size, stat.st_mtime_ns]
    if (checked.get(entry.name) != signature
        and not is_intact(entry.path, min_fields=_ENTRY_FIELDS)):
      _LOG.warning('Removing a truncated XLA cache entry: %s', entry.path)
      os.remove(entry.path)
      continue
    whole[entry.name] = signature
    entries.append((stat.st_mtime, stat.st_size, entry.path))
  total = sum(size for _, size, _ in entries)
  for _, size, path in sorted(entries):
    if total <= max_bytes:
      break
    os.remove(path)
    whole.pop(os.path.basename(path), None)
    total -= size
  if whole != checked:
    temporary = f'{checked_path}.{os.getpid()}'
    with open(temporary, 'w') as f:
      json.dump(whole, f)
    os.replace(temporary, checked_path)   # atomic: readers see old or new


def _configured_elsewhere() -> bool:
  return _DIR_FLAG in os.environ.get('TF_XLA_FLAGS', '')


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on for this process; returns its directory.

  Must run before TensorFlow is imported (it raises `RuntimeError` after).
  Returns None, with a warning, when the directory cannot be written. A
  cache directory already given in `TF_XLA_FLAGS` is left as it is (and
  returned).
  """
  if _configured_elsewhere():
    flags = os.environ['TF_XLA_FLAGS'].split()
    for flag in flags:
      if flag.startswith(_DIR_FLAG + '='):
        return flag.split('=', 1)[1]
  if 'tensorflow' in sys.modules:
    raise RuntimeError(
        'tfp_ffjord.compilation_cache.enable() must run before TensorFlow is '
        'imported: TensorFlow reads its XLA flags once, on import. Call it '
        f'first, or set {ENV}=1 (or a directory) before `import tfp_ffjord`, '
        f'or TF_XLA_FLAGS={_DIR_FLAG}=DIR.')
  directory = os.path.abspath(directory or default_directory())
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    problem = untrusted(directory)
    if problem:
      _LOG.warning('XLA compilation cache off: %s %s.', directory, problem)
      return None
    probe = os.path.join(directory, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
    tidy(directory)
  except OSError as e:
    _LOG.warning('XLA compilation cache off: cannot use %s (%s).', directory,
                 e)
    return None
  os.environ['TF_XLA_FLAGS'] = ' '.join(
      [os.environ.get('TF_XLA_FLAGS', ''), f'{_DIR_FLAG}={directory}',
       f'{_PREFIX_FLAG}={prefix()}']).strip()
  return directory


def configure(default_on: bool) -> Optional[str]:
  """The cache as `TFP_FFJORD_XLA_CACHE` asks, else on if `default_on`.

  `TFP_FFJORD_XLA_CACHE`: `0`/`off` never, `1`/`on` in the default
  directory, anything else is the directory. Does nothing (returns None)
  once TensorFlow is imported, unless `TF_XLA_FLAGS` already names a
  cache directory (returned).
  """
  setting = os.environ.get(ENV, '').strip()
  if setting.lower() in _OFF:
    return None
  if not setting and not default_on and not _configured_elsewhere():
    return None
  if 'tensorflow' in sys.modules and not _configured_elsewhere():
    return None
  directory = None if not setting or setting.lower() in _ON else setting
  return enable(directory)
