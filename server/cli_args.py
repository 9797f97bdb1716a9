"""Turn config dataclasses into argparse options (field ``max_model_len`` -> ``--max-model-len``)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _field_type(cls, f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is_list) of a field, with Optional[...] unwrapped."""
    annotation = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), defaults: dict | None = None
) -> None:
    """One ``--flag`` per field, with the field's default (or ``defaults[name]``) and ``metadata['help']``."""
    defaults = defaults or {}
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        default = defaults.get(f.name, default)
        help_text = f.metadata.get("help", "")
        typ, is_list = _field_type(cls, f)
        if typ is bool:
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            group.add_argument(flag, dest=f.name, default=default, type=typ, action="append",
                               help=f"{help_text} (repeatable)")
        else:
            group.add_argument(flag, dest=f.name, default=default, type=typ,
                               help=help_text if "default" in help_text else f"{help_text} (default: {default})".strip())


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# -- argparse ``type=`` checks for scripts' plain options (a bad value is a usage error, not a traceback)
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least {minimum}")
        return value

    parse.__name__ = "positive int" if minimum == 1 else f"int >= {minimum}"  # argparse names it in errors
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def int_list(text: str, minimum: int = 1) -> list[int]:
    """A comma list of integers, each at least ``minimum`` (``"1,8,32"``)."""
    check = _int_at_least(minimum)
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("the list is empty")
    return [check(part) for part in items]
