"""
The C{twistd aiproxy} dropin: a lazy L{ServiceMaker} pointing at L{aiproxy.tap}.
"""

from twisted.application.service import ServiceMaker

aiproxy = ServiceMaker(
    "aiproxy",
    "aiproxy.tap",
    "A streaming AI gateway (APISIX ai-proxy compatible).",
    "aiproxy",
)
