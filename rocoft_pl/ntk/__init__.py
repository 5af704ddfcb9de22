"""Empirical NTK analysis of RoCoFT (paper section 5): kernels over parameter sets (full, rows, columns,
LoRA, any selection), kernel comparisons, kernel logistic regression, k-shot sampling and plots.

Plots (matplotlib) are imported on use: ``from rocoft_pl.ntk.plots import plot_kernels, plot_spectra``.
"""

from .compare import compare_kernels, eigenspectrum, relative_difference
from .fewshot import LM_BFF_SEEDS, k_shot_split
from .kernel import as_matrix, empirical_ntk, full_set, scalar_kernel
from .kernel_file import load_kernels, save_kernels
from .klr import KernelLogisticRegression, fit_klr, predict_logits
from .outputs import ClassifierOutput, EmbeddingSimilarityOutput, MaskedLMOutput, encode_prompt, label_word_ids
from .sets import lora_set, rename_by_identity, rocoft_set, set_size

__all__ = [
    "LM_BFF_SEEDS",
    "ClassifierOutput",
    "EmbeddingSimilarityOutput",
    "KernelLogisticRegression",
    "MaskedLMOutput",
    "as_matrix",
    "compare_kernels",
    "eigenspectrum",
    "empirical_ntk",
    "encode_prompt",
    "fit_klr",
    "full_set",
    "k_shot_split",
    "label_word_ids",
    "load_kernels",
    "lora_set",
    "predict_logits",
    "relative_difference",
    "rename_by_identity",
    "rocoft_set",
    "save_kernels",
    "scalar_kernel",
    "set_size",
]
