"""Document filters: URL, language, Gopher quality and repetition, C4, FineWeb.

Each module holds one family of rules: a config dataclass whose defaults are the
published thresholds, and a stage class (``stage(doc) -> None | reason``).
"""

from lmforge.data.filters.c4 import C4Config, C4Filter
from lmforge.data.filters.fineweb import FineWebConfig, FineWebFilter
from lmforge.data.filters.gopher import (
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)
from lmforge.data.filters.language import LanguageConfig, LanguageFilter, LanguageIdentifier
from lmforge.data.filters.url import UrlFilter, UrlFilterConfig

__all__ = [
    "C4Config", "C4Filter", "FineWebConfig", "FineWebFilter", "GopherQuality", "GopherQualityConfig",
    "GopherRepetition", "GopherRepetitionConfig", "LanguageConfig", "LanguageFilter", "LanguageIdentifier",
    "UrlFilter", "UrlFilterConfig",
]
