"""Fixtures of the Serve HTTP tests: ``test_http.py``'s deployment on 127.0.0.1, for other modules
too.

``run_dir``, ``tokens``, ``server`` and ``url`` are module-scoped, so each module that uses them
gets its own deployment (one at a time: a module's ``server`` shuts Serve down when it ends).
Modules that define fixtures of the same names (``test_http.py``, ``test_http_vllm.py``) use theirs.
"""

import os
import sys
import tempfile
from pathlib import Path

# Hypothesis (the fuzz tests) keeps caches in .hypothesis/ of the working directory: not in the
# checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="hypothesis-"))

if str(Path(__file__).resolve().parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_http import run_dir, server, tokens, url  # noqa: F401 (re-exported fixtures)
