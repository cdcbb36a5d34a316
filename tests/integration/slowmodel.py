"""A `ManagedModel` whose load takes `options.load_s` seconds: a small random-weight torch
module behind a wait that stands in for reading a large model from disk, so a browser test can
see a load in flight (the bundled models load in 0.2-0.3 s)."""

from __future__ import annotations

import time
from typing import Any

from serve_app import ManagedModel


class SlowLoading(ManagedModel):
    def load(self, device: str) -> Any:
        from examples.byo.models import build_codec

        time.sleep(float(self.config.options.get("load_s", 3.0)))
        return build_codec(float(self.config.options.get("size_mib", 8)), device)
