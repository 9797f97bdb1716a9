"""The continuous-batching engine: scheduler, block manager, model runner, sampler, detokenizer."""
