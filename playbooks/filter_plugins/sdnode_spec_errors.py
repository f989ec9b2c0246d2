"""validate_argument_spec's errors as one short line per variable (`name: expected X, got Y`); its own
message carries the whole argument spec, thousands of characters in which the name is lost."""

from __future__ import annotations

import re

# The shapes of ansible.module_utils.common.parameters' messages; anything else passes unchanged.
TYPE = re.compile(
    r"^(?:argument|Elements value for option) '(?P<name>[^']+)'(?: found in '(?P<ctx>[^']+)'\.?)? "
    r"is of type (?P<type>\S+) and we were unable to convert to (?P<want>\w+): (?P<detail>.*)$",
    re.S,
)
CHOICE = re.compile(
    r"^value of (?P<name>\S+) must be one of: (?P<choices>.*), got: (?P<got>.*?)(?: found in .*)?$", re.S
)
# What was given, where the converter's message quotes it.
LITERAL = re.compile(
    r"invalid literal for \w+\(\)(?: with base \d+)?: (?P<got>.*)$"
    r"|^\"(?P<quoted>.*)\" cannot be converted"
)


def _choices(text: str) -> str:
    return " or ".join(c.strip() or '""' for c in text.split(","))


def short(message: str) -> str:
    message = str(message).strip()
    m = TYPE.match(message)
    if m:
        name = f"{m['ctx']} -> {m['name']}" if m["ctx"] else m["name"]
        want = m["want"] if message.startswith("argument") else f"a list of {m['want']}"
        literal = LITERAL.search(m["detail"])
        got = (literal["got"] or literal["quoted"]) if literal else f"a {m['type']} ({m['detail'].strip()})"
        return f"{name}: expected {want}, got {got}"
    m = CHOICE.match(message)
    if m:
        return f"{m['name']}: expected {_choices(m['choices'])}, got {m['got']!r}"
    return message


def sdnode_spec_errors(results: list) -> list[str]:
    """The short lines of every failed validate_argument_spec result in a loop's `results`."""
    lines: list[str] = []
    for result in results or []:
        for error in result.get("argument_errors") or []:
            line = short(error)  # role variables carry their role's prefix: no need to name the role
            if line not in lines:
                lines.append(line)
    return lines


class FilterModule:
    def filters(self):
        return {"sdnode_spec_errors": sdnode_spec_errors}
