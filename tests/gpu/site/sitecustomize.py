"""Imported at start-up by every Python that tests/gpu/run.sh starts (this folder is on its PYTHONPATH).

Adds $QWENVL_GPU_SITE, where run.sh installs what the machine lacks (pip --target), as a site folder *after*
the interpreter's own packages: it fills gaps and never shadows what the machine has (a wheel's dependency
such as numpy, downloaded again by pip --target, loses to the machine's own).
"""
import os
import site

if os.environ.get("QWENVL_GPU_SITE"):
    site.addsitedir(os.environ["QWENVL_GPU_SITE"])
