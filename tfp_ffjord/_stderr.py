"""Keeps TensorFlow's start-up lines off the command line's stderr."""

import contextlib
import os
import sys
import threading

__all__ = ['quiet_tensorflow_startup']


# Start-up messages TensorFlow's C++ runtime prints on stderr however
# TF_CPP_MIN_LOG_LEVEL is set; they would bury the command's own output.
_STARTUP_NOISE = (
    'All log messages before absl::InitializeLog()',
    'oneDNN custom operations are on',
    'Could not find cuda drivers',
    'failed call to cuInit',
    'This TensorFlow binary is optimized',
    'To enable the following instructions',
    'rebuild TensorFlow with the appropriate compiler flags',
    # Loading a cached executable: XLA lists its tuning pseudo-features
    # (prefer-no-gather/-scatter) as missing on the very machine that
    # compiled it. Entries of other CPUs are never loaded (their names
    # differ: `compilation_cache.cpu_fingerprint`).
    'Target machine feature +prefer-no-',
    # Loading a cached executable: TensorFlow tries to read the (binary)
    # entry as text first, and protobuf logs why that fails, three lines an
    # entry; the binary read that follows succeeds. (A failed load is
    # reported by other lines, which pass.)
    'Error parsing text-format tensorflow.XlaSerializedCacheEntry',
)


@contextlib.contextmanager
def quiet_tensorflow_startup():
  """Drops TensorFlow's start-up lines from stderr; passes everything else.

  Redirects file descriptor 2 into a pipe read by a thread, which forwards
  each line (or `\r`-terminated progress-bar update) unless it is one of
  `_STARTUP_NOISE`.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # No real stderr (e.g. captured): no-op.
    yield
    return
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)

  def pump():
    buf = b''
    while True:
      chunk = os.read(read_fd, 65536)
      buf += chunk
      while True:
        cut = max(buf.rfind(b'\n'), buf.rfind(b'\r'))
        if cut < 0 and chunk:
          break
        cut = len(buf) - 1 if cut < 0 else cut
        segment, buf = buf[:cut + 1], buf[cut + 1:]
        pieces = segment.replace(b'\r', b'\r\0').replace(
            b'\n', b'\n\0').split(b'\0')
        kept = [p for p in pieces if p and not any(
            n.encode() in p for n in _STARTUP_NOISE)]
        if kept:
          os.write(saved, b''.join(kept))
        break
      if not chunk:
        if buf:
          os.write(saved, buf)
        return

  thread = threading.Thread(target=pump, daemon=True)
  thread.start()
  try:
    yield
  finally:
    try:
      sys.stderr.flush()
    except ValueError:
      pass
    os.dup2(saved, 2)   # closes the pipe's last write end
    thread.join(timeout=5)
    os.close(read_fd)
    os.close(saved)
