"""The prototype's comma-separated style lists, parsed with errors that name the field."""

from __future__ import annotations

import math

MAX_STYLE_CHARS = 200


def split_list(value: str | None) -> list[str]:
    if value is None:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_floats(value: str | None, field: str) -> list[float]:
    """`"1.0, 0.5"` -> [1.0, 0.5]. Python's float() also reads "nan" and "inf", which
    would make a blend of NaNs: silence or noise, rendered in full before anything
    failed. They are refused here, naming the field."""
    out = []
    for part in split_list(value):
        try:
            number = float(part)
        except ValueError:
            raise ValueError(f"{field}: {part!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{field}: {part!r} is not a finite number")
        out.append(number)
    return out


def parse_styles(
    styles: str | None, style_weights: str | None, *, max_styles: int = 8
) -> list[tuple[str, float]]:
    """`"ambient, techno"` + `"1.0, 0.5"` -> [("ambient", 1.0), ("techno", 0.5)].

    Missing weights default to 1.0, as in the prototype.
    """
    names = split_list(styles)
    if len(names) > max_styles:
        raise ValueError(f"styles: at most {max_styles} styles, got {len(names)}")
    for name in names:
        if len(name) > MAX_STYLE_CHARS:
            raise ValueError(f"styles: each style is at most {MAX_STYLE_CHARS} characters")
    weights = parse_floats(style_weights, "style_weights")
    if len(weights) > len(names):
        raise ValueError(
            f"style_weights: got {len(weights)} weights for {len(names)} styles"
        )
    weights += [1.0] * (len(names) - len(weights))
    return list(zip(names, weights, strict=True))
