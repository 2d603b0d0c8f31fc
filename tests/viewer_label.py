"""The mask viewer's label, parsed: one parser for test_viewer.py and test_browser.py.

"SYN_P006_0000 slice 15 (15/27), tumour px 1264 | Dice slice 0.812, patient 0.790 @ threshold 0.50"
"""

import re

LABEL = re.compile(
    r"^(?P<patient>\S+) slice (?P<n>\d+) \((?P<pos>\d+)/(?P<depth>\d+)\), tumour px (?P<px>\d+)"
    r"(?: \| Dice slice (?P<dice_slice>[\d.]+), patient (?P<dice_patient>[\d.]+)"
    r" @ threshold (?P<threshold>[\d.]+))?$"
)


def parse(label: str) -> dict:
    """The label's fields as strings (the Dice fields None without predictions)."""
    match = LABEL.match(label.strip())
    assert match, f"unexpected viewer label: {label!r}"
    return match.groupdict()
