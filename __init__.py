"""D4IR: data-free distillation of weather-restoration networks with degradation-prompt diffusion.

Installed, the repository's top-level folders are this package's subpackages, floor by floor (imports point down):
`d4ir.shards` (files on disk) <- `d4ir.synth` (stages 1 and 2) <- `d4ir.distill` (stage 3) <- `d4ir.pipelines`
(the CLI, the experiments, the demo). The command line is `d4ir` (`d4ir.pipelines.cli:main`).
"""
