"""Phase 1 of a conversion: pure functions of tensor specs (names, shapes, dtypes) to a plan.

Nothing here reads tensor data or imports `weightbridge.io` or `weightbridge.streaming`.

- `planner`: `make_plan`, the entry point: renames, rules, layout flags, then the matcher.
- `rules`, `rulesfile`: explicit user rules (Python and the CLI's rules files).
- `layout_flags`: each parameter's name and axis change under ``--from F --to G``.
- `layouts`: what the matcher asks of one parameter (role, embedding, axis permutation, ops).
- `match`: the automatic matcher (`Matcher`, `match_specs`), which runs the passes below and
  returns a `match_result.MatchResult`:
  `tree` (module trees and signatures), `orientation` (2-D weights, per checkpoint),
  `pairing` (trees paired, ties broken by `evidence`, `order` and `hints`; `names` holds the
  word handling), `pair_ops` (ops per pair, from the layout rules), `refusal` (what could not
  be paired, with checked hints).
- `fused`: fused and stacked tensors split into virtual parts, and joined back.
- `shards`: which output shard each target tensor goes to.
"""
