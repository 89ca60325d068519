"""What counts as a number in a value from elsewhere (a member, a meter, a saved state): an int or a float that is
finite. A bool is not one (True would count as 1 A), nor is a NaN or an infinity."""
from __future__ import annotations

import math
from typing import Any, TypeGuard


def finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
