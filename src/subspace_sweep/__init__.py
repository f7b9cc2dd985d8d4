"""subspace-sweep: which base-model subspace explains a steering LoRA's effect?"""

__version__ = "0.1.0"
