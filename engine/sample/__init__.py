"""Sampling: logits of the rows that sample this step -> next tokens, with every per-sequence state it needs.

One owner: the ``Sampler`` (``sampler.py``) holds, keyed by sequence id, each sequence's seeded
generator, penalty counts, logit bias and allowed-token constraints (``state.py``), creates them,
updates them after each sampled token and frees them when the engine retires the sequence, all under
``torch.inference_mode``. Callers hand it tensors and small per-row descriptors (``SampleRow``), never
``Sequence`` objects.

Modules, in the order the sampler applies them (vLLM's order):

- ``constraints.py``: the allowed-token mask hook (``TokenConstraint``), applied batched through one packed
  int32 bitmask (xgrammar's layout); ``allowed_token_ids`` is one, grammars plug in the same way.
- ``logit_bias.py``: OpenAI's ``logit_bias``.
- ``penalties.py``: repetition (prompt + output), frequency and presence (output) penalties.
- ``filters.py``: top-k, top-p, min-p and the exponential-race draw.
"""

from kubeinfer.engine.sample.constraints import TokenConstraint
from kubeinfer.engine.sample.sampler import Sampler, SamplerOutput, SampleRow, SamplingBatch

__all__ = ["SampleRow", "Sampler", "SamplerOutput", "SamplingBatch", "TokenConstraint"]
