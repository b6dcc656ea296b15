"""Docker's go-units wording, shared by the engine (the API's "Up 3 minutes" statuses) and the CLI.

Dependency-free, like `_typing` and `_fastjson`: every layer may import it.
"""

from __future__ import annotations


def human_duration(seconds: float) -> str:
    """Docker's units.HumanDuration: "Less than a second", "3 seconds", "About a minute", …"""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // (24 * 7)} weeks"
    if h < 24 * 365 * 2:
        return f"{h // (24 * 30)} months"
    return f"{h // (24 * 365)} years"
