"""One weight load at a time in this process.

transformers and diffusers build models on the meta device by patching module constructors for the
duration of a load; two threads loading at once (two GPUs starting together, a ControlNet loading while
a classifier does) see each other's patches and fail with "Cannot copy out of meta tensor". Loads are
short next to the work they enable, so they are simply serialised.
"""

from __future__ import annotations

import threading

LOADING = threading.RLock()
