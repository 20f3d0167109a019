"""Continuous batching in the trusted runner (see docs/engine.md): every active request advances together,
one forward pass per step over a batch of rows, so each offloaded op is one call carrying every row.

  sequence.py   one request's state: its tokens, its sampler, its KV cache, how it ends
  kv.py         the KV memory budget, in fixed-size blocks, reserved whole at admission
  scheduler.py  waiting and running sequences; which rows the next step carries (decodes first, then
                fixed-size prefill chunks under the step's token budget)
  step.py       the Engine: one step = one batched forward (TrustedModel.forward_spans) + sampling
  loop.py       the engine's thread and its session with one compute server; failures, shutting a cheat out
"""
