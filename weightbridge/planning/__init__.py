"""Phase 1 of a conversion: pure functions of tensor specs (names, shapes, dtypes) to a plan.

Nothing here reads tensor data or imports `weightbridge.io` or `weightbridge.streaming`.
"""
