"""Visual-token compressors behind one protocol and one registry.

`VisualTokens` is the currency every stage trades; `parse_spec("random:ratio=0.1")` turns a
spec string into a compressor and its `Budget`; `compress(tokens, ctx)` does the work.
Importing this package registers every method: the baselines (none, avgpool, uniform,
random), fastv, corematching, videoscan, the diversity selectors (todre, divprune) and the
learned hicom and quecc.
"""

# Importing the method modules registers them.
from compressors import (  # noqa: F401
    baselines,
    corematching,
    diversity,
    fastv,
    hicom,
    quecc,
    videoscan,
)
from compressors.budget import Budget, BudgetError
from compressors.context import CompressionContext, ContextError
from compressors.protocol import Compressor
from compressors.registry import (
    BUDGET_PARAMS,
    CompressorInfo,
    CompressorSpec,
    ParamInfo,
    SpecError,
    list_compressors,
    parse_spec,
    register_compressor,
    unregister_compressor,
)
from compressors.tokens import VisualTokens

__all__ = [
    "BUDGET_PARAMS",
    "Budget",
    "BudgetError",
    "CompressionContext",
    "Compressor",
    "CompressorInfo",
    "CompressorSpec",
    "ContextError",
    "ParamInfo",
    "SpecError",
    "VisualTokens",
    "list_compressors",
    "parse_spec",
    "register_compressor",
    "unregister_compressor",
]
