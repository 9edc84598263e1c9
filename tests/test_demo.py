"""`make demo` runs and its exact rows agree with the token loop."""

import re

from flowssm import demo


def test_demo_exact_rows_agree(capsys):
    demo.main(["--B", "1", "--T", "40", "--H", "1", "--K", "8", "--chunk-size", "16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"^(reference|xla) ", line)]
    assert len(rows) == 8
    exact = [r for r in rows if "exact" in r[2] or "Exact" in r[2]]
    assert len(exact) == 4
    for r in exact:
        assert float(r[-3]) < 1e-5 and float(r[-2]) < 1e-5, r
