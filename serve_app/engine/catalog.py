"""The model variants by name, and the sizes clients ask for: what the API and the config
check a request against, without importing the models (and JAX) that `variants` builds.
The ingress validates `size` and `variant` and never runs a model."""

from __future__ import annotations

# each is a `Variant` in `variants.VARIANTS` (which checks that the two agree)
VARIANT_NAMES = ("mrt2_base", "mrt2_small", "tiny")

# `size` as the prototype's clients send it (MRT v1 had "base" and "large"), mapped
# to the Magenta RT 2 variant of that rank; exact variant names are accepted too.
SIZE_ALIASES = {"small": "mrt2_small", "base": "mrt2_base", "large": "mrt2_base"}


def check_variant_name(name: str, field: str = "variant") -> str:
    """`name` when a variant has it, or a ValueError naming `field` (where it was given)."""
    if name not in VARIANT_NAMES:
        raise ValueError(
            f"{field}: unknown model variant {name!r}; choose one of {sorted(VARIANT_NAMES)}")
    return name


def variant_for_size(size: str) -> str:
    """The model variant a `size` names, or a ValueError naming the field."""
    name = SIZE_ALIASES.get(size.strip().lower(), size.strip())
    if name not in VARIANT_NAMES:
        raise ValueError(
            f"size: unknown model size {size!r}; choose one of "
            f"{sorted({*SIZE_ALIASES, *VARIANT_NAMES})}"
        )
    return name
