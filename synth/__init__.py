"""Floor 2: stages 1 and 2 of D4IR.

The prompt encoder (the paper's degradation-aware prompt adapter) and its MoCo trainer (stage 1), loading
the frozen Stable Diffusion (`synth.sd`), the content-driven conditional diffusion sampler (`synth.ccd`) and
the per-shard worker (stage 2). Imports only `shards` (floor 1), torch, diffusers and transformers.
"""
