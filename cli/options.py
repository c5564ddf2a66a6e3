"""Option types shared by several commands."""

from __future__ import annotations

import click


def parse_value(text: str):
    """A NAME=VALUE parameter's value: int, float, true/false, else the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


class IndexParam(click.ParamType):
    """``NAME=VALUE`` (an index parameter, e.g. ``nprobe=16`` or ``store_dtype=float16``) -> (name, value)."""

    name = "NAME=VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):  # already converted (a default, or a --config mapping)
            return value
        name, sep, text = str(value).partition("=")
        if not sep or not name.strip():
            self.fail(f"{value!r} is not NAME=VALUE", param, ctx)
        return name.strip(), parse_value(text.strip())


INDEX_PARAM = IndexParam()
