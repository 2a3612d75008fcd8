from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("pydgemma")
except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0+unknown"
