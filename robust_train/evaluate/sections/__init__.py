"""The report's sections, registered by name in `SECTIONS` and run in their `order`."""
from robust_train.evaluate.sections.base import SECTIONS, Section, register_section, sections_in_order
from robust_train.evaluate.sections import (suite, minimal, transfer, checks, stability, universal,  # noqa: F401
                                            probes, pictures, type1)  # (register)

__all__ = ["SECTIONS", "Section", "register_section", "sections_in_order"]
