"""SIGINT as a flag that the training loop polls between steps."""

import contextlib
import signal
import threading

__all__ = ['sigint_flag']


@contextlib.contextmanager
def sigint_flag():
  """Turns the first SIGINT into a flag (`flag[0]`), the second into ^C.

  The flag only records the request; the training loop decides what to save
  and when to stop. Active only in the main thread (Python delivers signals
  there) and unless SIGINT is ignored (a background job); otherwise the
  flag never rises and SIGINT keeps its usual effect.
  """
  flag = [False]
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
    yield flag
    return

  def handler(signum, frame):
    del signum, frame
    if flag[0]:
      raise KeyboardInterrupt
    flag[0] = True

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, previous)
