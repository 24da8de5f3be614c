"""Numbers as a reader reads them: significant digits, not fixed decimals (a Δp of 3e-6 is not "-0.00000")."""
from __future__ import annotations

import csv
import io
import math


def sig(x, n: int = 3, sign: bool = False) -> str:
    """``x`` to ``n`` significant digits; plain notation from 1e-3 up to 10**n, scientific outside; "—" for
    a missing or undefined value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    x = float(x)
    plus = "+" if sign and x > 0 else ""
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 10 ** n:
        return f"{plus}{x:.0f}"
    if a < 1e-3:
        return f"{plus}{x:.{max(n - 1, 0)}e}"
    digits = max(n - 1 - math.floor(math.log10(a)), 0)
    return f"{plus}{x:.{digits}f}"


def ci(value, lo, hi, n: int = 3, sign: bool = False) -> str:
    """'value [lo, hi]'; the value alone where the interval is undefined."""
    v = sig(value, n, sign)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return v
    return f"{v} [{sig(lo, n, sign)}, {sig(hi, n, sign)}]"


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """``rows`` as CSV with ``fields`` for columns, None as an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in fields} for row in rows)
    return buf.getvalue()
