"""Evaluation of SAEs: the core metrics (reconstruction and the spliced LM loss, :mod:`.core`) and the
paper's other metrics, one module each (compute-equivalent, ablation sparsity, probe loss, N2G),
run together by :mod:`.suite`. Pure computations: the jobs layer writes files and reports."""
