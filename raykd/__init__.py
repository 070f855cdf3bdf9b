"""raykd: distil, reinforce, quantize and evaluate LLMs on Ray."""

import os as _os

# An embedded Ray node must listen on loopback only. Ray reads this variable when it is
# imported, so it is set here, before any raykd module imports Ray. A job under
# `ray job submit` (RAY_ADDRESS set) joins its cluster and keeps Ray's own addressing.
if "RAY_ADDRESS" not in _os.environ and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in _os.environ:
    _os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    _os.environ["RAYKD_LOOPBACK_NODE"] = "1"

__version__ = "0.1.0"
