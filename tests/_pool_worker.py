"""The task of test_tfds_usage's process-pool workers, in a module of its own: a spawned worker imports the
module of the function it runs, and this one imports nothing heavy (test_tfds_usage imports the training task,
flax, orbax, ...: about a second of CPU in each of the test's workers)."""

import os
import time


def worker_pid(_):
  time.sleep(0.2)
  return os.getpid()
