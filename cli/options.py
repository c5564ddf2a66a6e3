"""Option types shared by several commands."""

from __future__ import annotations

import click

from faiss_index.kinds import parse_value


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
